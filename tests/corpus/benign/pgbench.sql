-- pgbench 18 built-in scripts (`pgbench --show-script=tpcb-like|simple-update|select-only`), as pgbench
-- sends them: -M simple substitutes the variables as literals, -M extended/prepared sends $n.
-- pgbench simple
BEGIN;
-- pgbench simple
UPDATE pgbench_accounts SET abalance = abalance + -2817 WHERE aid = 51201;
-- pgbench simple
SELECT abalance FROM pgbench_accounts WHERE aid = 51201;
-- pgbench simple
UPDATE pgbench_tellers SET tbalance = tbalance + -2817 WHERE tid = 7;
-- pgbench simple
UPDATE pgbench_branches SET bbalance = bbalance + -2817 WHERE bid = 1;
-- pgbench simple
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 51201, -2817, CURRENT_TIMESTAMP);
-- pgbench simple
END;
-- pgbench extended
UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;
-- pgbench extended
SELECT abalance FROM pgbench_accounts WHERE aid = $1;
-- pgbench extended
UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;
-- pgbench extended
UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;
-- pgbench extended
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);
-- pgbench on start (connection check and scale lookup)
select count(*) from pgbench_branches;
