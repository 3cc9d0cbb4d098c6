-- The W3C `traceparent` of the request that submitted a workflow (issue 19
-- §5): the worker that runs it later continues the same trace, as a job's
-- does (0003). NULL when no OpenTelemetry layer was installed at submission.
ALTER TABLE workflows ADD COLUMN trace_parent TEXT;
