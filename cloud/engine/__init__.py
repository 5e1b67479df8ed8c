"""The cloud engine: Spark Structured Streaming over the relays' batches.

Data path: :mod:`cloud.engine.kinesis` (the streaming source) →
:mod:`cloud.engine.transform` (decode relay batches into flow rows, drop
duplicate batches, set invalid records aside) → :mod:`cloud.engine.estimates`
(full-network totals from sampled counts) → sinks.  :mod:`cloud.engine.job`
wires them into one streaming query; :mod:`cloud.engine.commands` is the
``sampleflow engine`` command line.
"""
