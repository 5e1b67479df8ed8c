"""The whole pipeline on one machine: the local stack and the demo.

* :mod:`cloud.local.settings`: ports, the state folder and the other
  settings of ``sampleflow local`` and ``sampleflow demo``.
* :mod:`cloud.local.stack`: starts, supervises and stops the local servers
  (MiniStack, the MongoDB-compatible store, the engine, the relay) as
  child processes on loopback.
* :mod:`cloud.local.exporter`: an IPFIX exporting process for
  ``FLOW_DTYPE`` records.
* :mod:`cloud.local.replay`: sends records (or a capture's datagrams) to
  the relay over UDP at a speed-up of real time.
* :mod:`cloud.local.scorer`: host-window detections from the batches on
  the stream, while the model service is not part of the stack.
* :mod:`cloud.local.demo`: ``sampleflow demo``, real CTU-13 traffic end to
  end with a report.
* :mod:`cloud.local.commands`: the command line.
"""
