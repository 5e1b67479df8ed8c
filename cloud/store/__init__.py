"""Where the engine's results and per-tenant state are kept.

* :mod:`cloud.store.detections`: detections and network estimates in a
  MongoDB-compatible store (Amazon DocumentDB in production), upserted by
  deterministic ids so a replayed micro-batch writes nothing twice.
* :mod:`cloud.store.state`: per-tenant state in DynamoDB (last seen per
  relay and exporter, record rate, effective sampling rate, model version)
  with conditional, atomic updates.
* :mod:`cloud.store.metrics`: per-micro-batch metrics to CloudWatch.

Each module imports only its own client library (pymongo or boto3), so
using one does not need the others' dependencies.
"""
