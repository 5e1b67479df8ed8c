"""The cloud model service: scores host-window feature rows over HTTP.

Data path: :mod:`~cloud.model_service.registry` finds and loads per-tenant
models (a folder or S3, reloaded when a manifest changes) →
:mod:`~cloud.model_service.scoring` validates rows and scores a whole batch
in one pass → :mod:`~cloud.model_service.app` serves it (FastAPI) →
:mod:`~cloud.model_service.commands` is ``sampleflow model-service``.
The engine talks to it through :mod:`cloud.scoring_client`.  See
docs/model-service.md.
"""
