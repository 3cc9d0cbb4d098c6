-- The W3C `traceparent` of the request that submitted a job (issue 19 §5):
-- the worker that dispatches it later continues the same trace. NULL when
-- no OpenTelemetry layer was installed at submission.
ALTER TABLE jobs ADD COLUMN trace_parent TEXT;
