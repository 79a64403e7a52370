-- Ordinary reporting SQL: CTEs, window functions, FILTER, ROLLUP/CUBE/GROUPING SETS, LATERAL, comments.
-- report monthly revenue with running total
WITH monthly AS (
  SELECT date_trunc('month', o.ordered_at) AS month, sum(o.amount) AS revenue
  FROM sales.orders o
  WHERE o.ordered_at >= now() - interval '12 months'
  GROUP BY 1
)
SELECT month, revenue, sum(revenue) OVER (ORDER BY month) AS running_total,
       revenue - lag(revenue) OVER (ORDER BY month) AS change
FROM monthly
ORDER BY month;
-- report FILTER aggregates per region
SELECT region,
       count(*) AS orders,
       count(*) FILTER (WHERE status = 'refunded') AS refunded,
       avg(amount) FILTER (WHERE status <> 'refunded') AS avg_paid
FROM sales.orders
GROUP BY region
HAVING count(*) > 10
ORDER BY orders DESC;
-- report ROLLUP subtotals
SELECT coalesce(region, 'all regions') AS region, coalesce(channel, 'all channels') AS channel,
       sum(amount) AS revenue, grouping(region, channel) AS level
FROM sales.orders
GROUP BY ROLLUP (region, channel)
ORDER BY region NULLS LAST, channel NULLS LAST;
-- report CUBE and GROUPING SETS
SELECT region, product_id, sum(quantity) AS units
FROM sales.order_lines
GROUP BY GROUPING SETS ((region, product_id), (region), ())
UNION ALL
SELECT region, product_id, sum(quantity) FROM sales.returns GROUP BY CUBE (region, product_id);
-- report top 3 products per category
SELECT * FROM (
  SELECT p.category, p.name, sum(l.quantity) AS units,
         rank() OVER (PARTITION BY p.category ORDER BY sum(l.quantity) DESC) AS rnk
  FROM sales.order_lines l JOIN catalog.products p ON p.id = l.product_id
  GROUP BY p.category, p.name
) ranked
WHERE rnk <= 3
ORDER BY category, rnk;
-- report recursive org chart
WITH RECURSIVE chain AS (
  SELECT id, manager_id, name, 1 AS depth FROM hr.employees WHERE manager_id IS NULL
  UNION ALL
  SELECT e.id, e.manager_id, e.name, c.depth + 1 FROM hr.employees e JOIN chain c ON e.manager_id = c.id
)
SELECT depth, count(*) FROM chain GROUP BY depth ORDER BY depth;
-- report daily spine with generate_series
SELECT d::date AS day, coalesce(sum(o.amount), 0) AS revenue
FROM generate_series(date '2024-01-01', date '2024-03-31', interval '1 day') AS d
LEFT JOIN sales.orders o ON o.ordered_at::date = d::date
GROUP BY d
ORDER BY d;
-- report LATERAL latest order per customer
SELECT c.id, c.segment, last_order.ordered_at, last_order.amount
FROM crm.customers c
CROSS JOIN LATERAL (
  SELECT o.ordered_at, o.amount FROM sales.orders o WHERE o.customer_id = c.id ORDER BY o.ordered_at DESC LIMIT 1
) AS last_order
WHERE c.segment IN ('smb', 'enterprise');
-- report DISTINCT ON and percentiles
SELECT DISTINCT ON (region) region, ordered_at, amount FROM sales.orders ORDER BY region, ordered_at DESC;
-- report percentile_cont
SELECT region, percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) AS median,
       percentile_disc(0.9) WITHIN GROUP (ORDER BY amount) AS p90
FROM sales.orders GROUP BY region;
-- report share of total with scalar subquery cast
SELECT region, count(*)::numeric / (SELECT count(*) FROM sales.orders)::numeric AS share
FROM sales.orders GROUP BY region;
-- report query-builder idiom with WHERE 1=1
SELECT id, amount FROM sales.orders WHERE 1=1 AND region = 'emea' AND amount > 100 ORDER BY id LIMIT 50;
-- report query-builder idiom with WHERE TRUE
SELECT id, amount FROM sales.orders WHERE TRUE AND status = 'paid';
-- report metadata-only WHERE 1=0
SELECT * FROM sales.orders WHERE 1=0;
-- report string_agg with chr(10) separator
SELECT customer_id, string_agg(note, chr(10) ORDER BY created_at) AS notes,
       replace(replace(max(note), chr(13), ''), chr(10), ' ') AS last_note_one_line
FROM crm.notes GROUP BY customer_id;
-- report with comments written by an analyst
SELECT region,           -- sales region
       sum(amount)       /* gross, before refunds */ AS gross
FROM sales.orders
  -- only this year
WHERE ordered_at >= date_trunc('year', now())
GROUP BY region;
-- report cohort retention
WITH firsts AS (
  SELECT customer_id, min(date_trunc('month', ordered_at)) AS cohort FROM sales.orders GROUP BY 1
), activity AS (
  SELECT f.cohort, date_trunc('month', o.ordered_at) AS month, count(DISTINCT o.customer_id) AS active
  FROM sales.orders o JOIN firsts f USING (customer_id)
  GROUP BY 1, 2
)
SELECT cohort, month, active,
       round(100.0 * active / first_value(active) OVER (PARTITION BY cohort ORDER BY month), 1) AS pct
FROM activity ORDER BY cohort, month;
-- report totals row from a table
SELECT region, sum(amount) AS revenue FROM sales.orders GROUP BY region
UNION ALL
SELECT 'total', sum(amount) FROM sales.orders;
-- report EXISTS and NOT IN
SELECT c.id FROM crm.customers c
WHERE EXISTS (SELECT 1 FROM sales.orders o WHERE o.customer_id = c.id AND o.amount > 1000)
  AND c.id NOT IN (SELECT customer_id FROM crm.blocklist WHERE customer_id IS NOT NULL);
-- report jsonb
SELECT payload ->> 'event' AS event, count(*) FROM events.raw
WHERE payload @> '{"source": "web"}' AND received_at > now() - interval '1 day'
GROUP BY 1 ORDER BY 2 DESC;
-- report EXPLAIN
EXPLAIN SELECT region, sum(amount) FROM sales.orders GROUP BY region;
-- report window frame moving average
SELECT day, visits, avg(visits) OVER (ORDER BY day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW) AS avg7
FROM web.daily_visits;
-- report CASE buckets with BETWEEN
SELECT CASE WHEN amount < 50 THEN 'small' WHEN amount BETWEEN 50 AND 500 THEN 'medium' ELSE 'large' END AS size,
       count(*)
FROM sales.orders GROUP BY 1;
-- report cursor
DECLARE report_cursor CURSOR FOR SELECT id, amount FROM sales.orders ORDER BY id;
-- report COPY to the client
COPY (SELECT region, sum(amount) FROM sales.orders GROUP BY region) TO STDOUT WITH (FORMAT csv, HEADER);
-- report typed parameters from a BI tool
SELECT id, amount FROM sales.orders WHERE ordered_at BETWEEN $1::timestamptz AND $2::timestamptz AND ($3::text IS NULL OR region = $3);
