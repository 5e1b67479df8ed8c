"""The whole pipeline on one machine: the local stack and the demo.

* :mod:`cloud.local.settings`: ports, the state folder and the other
  settings of ``sampleflow local`` and ``sampleflow demo``.
* :mod:`cloud.local.stack`: starts, supervises and stops the local servers
  (MiniStack, the MongoDB-compatible store, the model service, the Spark
  engine, the relay) as child processes on loopback.
* :mod:`cloud.local.exporter`: an IPFIX exporting process for
  ``FLOW_DTYPE`` records.
* :mod:`cloud.local.replay`: sends records (or a capture's datagrams) to
  the relay over UDP at a speed-up of real time.
* :mod:`cloud.local.capture`: the slice of CTU-13 the demo replays, its
  true totals and its time shift.
* :mod:`cloud.local.stream`: reads the relay batches off the stream as a
  second consumer.
* :mod:`cloud.local.results`: the engine's estimates and detections.
* :mod:`cloud.local.report`: the demo's report.
* :mod:`cloud.local.demo`: ``sampleflow demo``.
* :mod:`cloud.local.commands`: the command line.
"""
