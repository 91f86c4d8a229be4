-- A dataset version made from a query on ingest's index keeps the query and its label rule
-- (the series it found are its items); '{}' for a version made from a list of series.
ALTER TABLE datasets ADD COLUMN query jsonb NOT NULL DEFAULT '{}';
