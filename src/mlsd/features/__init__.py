"""Step 3b: feature definitions, point-in-time computation, feature store.

Feast's import would switch the process's Prometheus metrics to file-backed values and leave a
temp folder behind; :mod:`mlsd`'s own import prevents both (see there).
"""
