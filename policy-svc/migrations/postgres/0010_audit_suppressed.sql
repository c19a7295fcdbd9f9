-- Issue 19: refusals anyone can cause without a credential (token_unknown,
-- token_malformed) are written one by one only up to a budget per second; beyond it
-- they are counted, and the count is written as one summary row per code and second
-- (kind 'decision', action 'deny', the code, `at` the second's start). NULL on every
-- other row.
ALTER TABLE audit_events ADD COLUMN suppressed BIGINT;
