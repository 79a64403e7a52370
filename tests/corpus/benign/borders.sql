-- Ordinary SQL next to the probes the rules refuse: server values, sort keys, LIMIT/OFFSET, UNION.
-- borders row-security style filter on the login
SELECT id, title FROM docs.documents WHERE owner = current_user ORDER BY updated_at DESC LIMIT 50;
-- borders row-security caching idiom (SELECT current_user)
SELECT id, title FROM docs.documents WHERE owner = (SELECT current_user) AND NOT archived;
-- borders tenant looked up by the login
SELECT o.id, o.amount FROM sales.orders o
WHERE o.tenant_id IN (SELECT t.id FROM crm.tenants t WHERE t.db_login = session_user);
-- borders tenant from a custom setting
SELECT id, amount FROM sales.orders WHERE tenant_id = current_setting('app.tenant_id')::int;
-- borders per-row role membership
SELECT id, title FROM docs.documents WHERE pg_has_role(owner, 'member') OR shared;
-- borders home path built from the login
SELECT name, size FROM files.entries WHERE path = '/home/' || current_user || '/inbox';
-- borders own session's rows in a log table
SELECT at, message FROM ops.app_log WHERE backend_pid = pg_backend_pid() ORDER BY at DESC LIMIT 100;
-- borders own rows sorted first
SELECT id, title, owner = current_user AS mine FROM docs.documents ORDER BY owner = current_user DESC, title;
-- borders sort by expressions of columns
SELECT id, name, price FROM shop.products
ORDER BY CASE WHEN stock = 0 THEN 1 ELSE 0 END, lower(name) COLLATE "C", price DESC NULLS LAST, 2;
-- borders sort by a correlated count
SELECT c.id, c.name FROM crm.customers c
ORDER BY (SELECT count(*) FROM sales.orders o WHERE o.customer_id = c.id) DESC LIMIT 10;
-- borders random sample
SELECT id, name FROM shop.products ORDER BY random() LIMIT 5;
-- borders dynamic sort chosen by parameters
SELECT id, name, price FROM shop.products
ORDER BY CASE WHEN $1 = 'price' THEN price END, CASE WHEN $1 = 'name' THEN name END LIMIT $2 OFFSET $3;
-- borders top tenth by a LIMIT subquery
SELECT id, score FROM games.scores ORDER BY score DESC LIMIT (SELECT count(*) / 10 FROM games.scores);
-- borders keyset page with OFFSET arithmetic
SELECT id, name FROM shop.products WHERE id > $1 ORDER BY id LIMIT 20 OFFSET 20 * 3;
-- borders row numbers without an order (SQL Server habit)
SELECT id, row_number() OVER (ORDER BY (SELECT NULL)) AS n FROM shop.products;
-- borders LIKE pattern from another row
SELECT f.id, f.path FROM files.entries f
WHERE f.path LIKE (SELECT d.path FROM files.entries d WHERE d.id = 7) || '/%';
-- borders server facts in the select list next to data
SELECT count(*) AS products, current_database() AS db, version() AS server, now() AS at FROM shop.products;
-- borders UNION with the login in both branches
SELECT 'doc' AS kind, title, current_user AS viewer FROM docs.documents
UNION ALL
SELECT 'file', path, current_user FROM files.entries;
-- borders driver reads the server version number
SELECT current_setting('server_version_num')::int AS server_version_num;
-- borders check own privileges on a table
SELECT has_table_privilege('shop.products', 'SELECT') AS can_read, current_user;
-- borders login name as regrole
SELECT id FROM docs.documents WHERE owner_oid = current_user::regrole::oid;
-- borders people sleep next to data while testing cancellation
SELECT id, pg_sleep(0.01) FROM shop.products;
