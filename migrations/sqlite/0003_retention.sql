-- Retention (see migrations/postgres/0004): an ended job pruned of its
-- rows keeps its counts here.
ALTER TABLE jobs ADD COLUMN pruned_at REAL;
ALTER TABLE jobs ADD COLUMN summary TEXT;
