"""The Files and Batch APIs' machinery: records (batch_records.py), input checking
(batch_input.py), storage in the object store (batch_store.py), the worker that runs lines
(batch_worker.py), the supervisor that finishes batches (batch_supervisor.py), and the service
that holds them on the Runtime (batch_service.py)."""
