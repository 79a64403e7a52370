-- The verified restaurant-review platform of "7 Layers of MLOps Security" (part 1: data):
-- schema, deterministic data, demo login roles and their grants. Run once, as a superuser, in an
-- empty database. Every "random" value is derived from md5() of a key, so each load produces the
-- same rows on every PostgreSQL version. All people, e-mail addresses, phone numbers and
-- identifiers are fictitious (example.* domains, 555 numbers, 9xx national ids).

SET client_min_messages = warning;

-- rnd(key, n): a deterministic pseudo-random integer in [0, n).
CREATE FUNCTION pg_temp.rnd(key text, n integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT ((('x' || substr(md5(key), 1, 8))::bit(32)::bigint) % n)::integer $$;

-- pick(key, items): a deterministic pseudo-random element of items.
CREATE FUNCTION pg_temp.pick(key text, items text[]) RETURNS text
LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT items[1 + pg_temp.rnd(key, cardinality(items))] $$;

-- Cities: name, region, postal-code prefix.
CREATE TEMP TABLE demo_city (n integer PRIMARY KEY, city text, region text, zip_prefix text);
INSERT INTO demo_city VALUES
  (0, 'Seattle', 'us', '981'), (1, 'Austin', 'us', '787'), (2, 'Chicago', 'us', '606'),
  (3, 'Boston', 'us', '021'), (4, 'Denver', 'us', '802'), (5, 'Portland', 'us', '972'),
  (6, 'Toronto', 'ca', 'M5V'), (7, 'Vancouver', 'ca', 'V6B'), (8, 'Montreal', 'ca', 'H2X'),
  (9, 'Berlin', 'eu', '101'), (10, 'Paris', 'eu', '750'), (11, 'Madrid', 'eu', '280'),
  (12, 'Dublin', 'eu', 'D02'), (13, 'Amsterdam', 'eu', '101');

------------------------------------------------------------------------------------------------
-- Operational data (schema public): what the review app reads and writes.
------------------------------------------------------------------------------------------------

CREATE TABLE public.users (
  id                integer PRIMARY KEY,
  full_name         text NOT NULL,
  email             text NOT NULL UNIQUE,
  password_hash     text NOT NULL,
  phone             text,
  region            text NOT NULL,
  research_opt_out  boolean NOT NULL DEFAULT false,
  created_at        timestamptz NOT NULL
);

CREATE TABLE public.user_demographics (
  user_id     integer PRIMARY KEY REFERENCES public.users (id),
  birth_date  date NOT NULL,
  gender      text NOT NULL,
  city        text NOT NULL,
  zip         text NOT NULL
);

CREATE TABLE public.identity_verifications (
  id                    integer PRIMARY KEY,
  user_id               integer NOT NULL REFERENCES public.users (id),
  document_type         text NOT NULL,
  document_number_hash  text NOT NULL,
  national_id           text NOT NULL,
  verified_at           timestamptz NOT NULL,
  verified_by           text NOT NULL
);

CREATE TABLE public.restaurants (
  id           integer PRIMARY KEY,
  name         text NOT NULL,
  cuisine      text NOT NULL,
  city         text NOT NULL,
  region       text NOT NULL,
  price_band   smallint NOT NULL,
  opened_on    date NOT NULL
);

CREATE TABLE public.menu_items (
  id             integer PRIMARY KEY,
  restaurant_id  integer NOT NULL REFERENCES public.restaurants (id),
  name           text NOT NULL,
  price          numeric(8, 2) NOT NULL,
  is_vegetarian  boolean NOT NULL
);

CREATE TABLE public.reviews (
  id             integer PRIMARY KEY,
  user_id        integer NOT NULL REFERENCES public.users (id),
  restaurant_id  integer NOT NULL REFERENCES public.restaurants (id),
  rating         smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
  body           text NOT NULL,
  created_at     timestamptz NOT NULL
);

CREATE TABLE public.review_photos (
  id           integer PRIMARY KEY,
  review_id    integer NOT NULL REFERENCES public.reviews (id),
  storage_url  text NOT NULL,
  caption      text,
  uploaded_at  timestamptz NOT NULL
);

INSERT INTO public.users
SELECT i,
       first || ' ' || last,
       lower(first) || '.' || lower(last) || i || '@'
         || pg_temp.pick('domain' || i, ARRAY['example.com', 'example.org', 'example.net']),
       '$2b$12$' || substr(md5('salt' || i) || md5('pw' || i), 1, 53),
       '+1 555 01' || lpad(pg_temp.rnd('phone' || i, 100)::text, 2, '0') || ' '
         || lpad(pg_temp.rnd('line' || i, 10000)::text, 4, '0'),
       c.region,
       i > 10 AND pg_temp.rnd('optout' || i, 20) = 0,
       timestamptz '2023-01-01 00:00:00+00' + make_interval(mins => pg_temp.rnd('joined' || i, 730 * 24 * 60))
FROM generate_series(1, 1000) AS i,
     LATERAL (SELECT pg_temp.pick('first' || i, ARRAY[
       'Jane', 'John', 'Amara', 'Luis', 'Mei', 'Noah', 'Olivia', 'Ravi', 'Sofia', 'Tomas',
       'Yara', 'Elena', 'Kofi', 'Hana', 'Marco', 'Priya', 'Liam', 'Aisha', 'Jonas', 'Chloe',
       'Diego', 'Ingrid', 'Kenji', 'Fatima', 'Owen', 'Nadia', 'Pierre', 'Zoe', 'Mateo', 'Leila']) AS first,
       pg_temp.pick('last' || i, ARRAY[
       'Doe', 'Smith', 'Okafor', 'Garcia', 'Chen', 'Muller', 'Rossi', 'Patel', 'Kowalski', 'Silva',
       'Nakamura', 'Haddad', 'Johansson', 'Dubois', 'Moreau', 'Kim', 'Novak', 'Brennan', 'Costa',
       'Fischer', 'Ivanova', 'Lopez', 'Mensah', 'Olsen', 'Park', 'Quinn', 'Reyes', 'Sato']) AS last) AS n,
     LATERAL (SELECT region FROM demo_city WHERE demo_city.n = pg_temp.rnd('city' || i, 14)) AS c;

INSERT INTO public.user_demographics
SELECT i,
       date '1950-01-01' + pg_temp.rnd('born' || i, 365 * 55),
       pg_temp.pick('gender' || i, ARRAY['female', 'female', 'male', 'male', 'nonbinary', 'undisclosed']),
       c.city,
       c.zip_prefix || lpad(pg_temp.rnd('zip' || i, 100)::text, 2, '0')
FROM generate_series(1, 1000) AS i
JOIN demo_city AS c ON c.n = pg_temp.rnd('city' || i, 14);

INSERT INTO public.identity_verifications
SELECT row_number() OVER (ORDER BY u.id),
       u.id,
       doc.kind,
       encode(sha256(convert_to(doc.kind || ':' || md5('document' || u.id), 'UTF8')), 'hex'),
       '9' || lpad(pg_temp.rnd('area' || u.id, 100)::text, 2, '0') || '-'
         || lpad(pg_temp.rnd('group' || u.id, 100)::text, 2, '0') || '-'
         || lpad(pg_temp.rnd('serial' || u.id, 10000)::text, 4, '0'),
       u.created_at + make_interval(hours => 1 + pg_temp.rnd('verified' || u.id, 72)),
       'verifier_' || (1 + pg_temp.rnd('verifier' || u.id, 6))
FROM public.users AS u,
     LATERAL (SELECT pg_temp.pick('doc' || u.id, ARRAY['passport', 'drivers_license', 'national_id']) AS kind) AS doc
WHERE pg_temp.rnd('verify' || u.id, 10) < 6;

INSERT INTO public.restaurants
SELECT i,
       pg_temp.pick('adj' || i, ARRAY['Golden', 'Rustic', 'Little', 'Blue', 'Hidden', 'Smoky',
         'Silver', 'Green', 'Crooked', 'Happy', 'Wild', 'Copper'])
         || ' ' || pg_temp.pick('noun' || i, ARRAY['Fork', 'Lantern', 'Table', 'Olive', 'Dragon',
         'Harbor', 'Garden', 'Kettle', 'Fig', 'Ember', 'Spoon', 'Pepper']) || ' #' || i,
       pg_temp.pick('cuisine' || i, ARRAY['italian', 'japanese', 'mexican', 'indian', 'french',
         'thai', 'ethiopian', 'lebanese', 'korean', 'vegan']),
       c.city,
       c.region,
       1 + pg_temp.rnd('price' || i, 4),
       date '2005-01-01' + pg_temp.rnd('opened' || i, 365 * 18)
FROM generate_series(1, 120) AS i
JOIN demo_city AS c ON c.n = pg_temp.rnd('rcity' || i, 14);

INSERT INTO public.menu_items
SELECT (r - 1) * 8 + k,
       r,
       pg_temp.pick('dish' || r || '/' || k, ARRAY['Margherita', 'Ramen', 'Tacos al pastor',
         'Chana masala', 'Coq au vin', 'Pad thai', 'Injera platter', 'Falafel wrap', 'Bibimbap',
         'Mushroom risotto', 'Miso soup', 'Churros', 'Tiramisu', 'Green curry', 'Shakshuka',
         'Gyoza', 'Lentil soup', 'Burrata salad', 'Kimchi fried rice', 'Creme brulee']),
       (6 + pg_temp.rnd('cost' || r || '/' || k, 3900) / 100.0)::numeric(8, 2),
       pg_temp.rnd('veg' || r || '/' || k, 3) = 0
FROM generate_series(1, 120) AS r, generate_series(1, 8) AS k;

INSERT INTO public.reviews
SELECT i,
       u.id,
       1 + pg_temp.rnd('place' || i, 120),
       stars.rating,
       CASE stars.rating
         WHEN 5 THEN pg_temp.pick('b5' || i, ARRAY['Outstanding meal, will be back.',
           'Best dinner we had this year.', 'Friendly staff and perfect food.'])
         WHEN 4 THEN pg_temp.pick('b4' || i, ARRAY['Very good, a little noisy.',
           'Great food, slow service.', 'Solid choice for a weeknight.'])
         WHEN 3 THEN pg_temp.pick('b3' || i, ARRAY['It was fine.', 'Average, nothing special.',
           'Good starters, forgettable mains.'])
         WHEN 2 THEN pg_temp.pick('b2' || i, ARRAY['Cold food and a long wait.',
           'Overpriced for what you get.', 'Would not order the special again.'])
         ELSE pg_temp.pick('b1' || i, ARRAY['Terrible experience.', 'Found a hair in my soup.',
           'Rude staff, never again.'])
       END,
       u.created_at + make_interval(mins => pg_temp.rnd('posted' || i, 300 * 24 * 60))
FROM generate_series(1, 3000) AS i
JOIN public.users AS u ON u.id = 1 + pg_temp.rnd('author' || i, 1000),
     LATERAL (SELECT (ARRAY[1, 2, 3, 3, 4, 4, 4, 5, 5, 5])[1 + pg_temp.rnd('stars' || i, 10)]::smallint
              AS rating) AS stars;

INSERT INTO public.review_photos
SELECT row_number() OVER (ORDER BY r.id),
       r.id,
       's3://reviews-photos/' || r.id || '/' || substr(md5('photo' || r.id), 1, 12) || '.jpg',
       pg_temp.pick('caption' || r.id, ARRAY['The main course', 'Dessert', 'The dining room', NULL]),
       r.created_at + make_interval(mins => 1 + pg_temp.rnd('upload' || r.id, 30))
FROM public.reviews AS r
WHERE pg_temp.rnd('photo' || r.id, 5) < 2;

------------------------------------------------------------------------------------------------
-- Derived data (schema analytics): the sentiment model's output and the views built on it.
------------------------------------------------------------------------------------------------

CREATE SCHEMA analytics;

CREATE TABLE analytics.review_sentiment (
  review_id      integer PRIMARY KEY REFERENCES public.reviews (id),
  model_version  text NOT NULL,
  sentiment      text NOT NULL,
  score          numeric(4, 3) NOT NULL,
  scored_at      timestamptz NOT NULL
);

INSERT INTO analytics.review_sentiment
SELECT r.id,
       CASE WHEN r.created_at < timestamptz '2024-06-01 00:00:00+00' THEN 'sentiment-2.3.1'
            ELSE 'sentiment-2.4.0' END,
       label.sentiment,
       label.score,
       r.created_at + interval '5 minutes'
FROM public.reviews AS r,
     LATERAL (SELECT CASE
                WHEN pg_temp.rnd('noise' || r.id, 10) = 0 THEN 'neutral'
                WHEN r.rating >= 4 THEN 'positive'
                WHEN r.rating = 3 THEN 'neutral'
                ELSE 'negative' END AS sentiment,
              ((500 + pg_temp.rnd('confidence' || r.id, 500)) / 1000.0)::numeric(4, 3) AS score) AS label;

-- The article's derived dataset for the marketing analyst.
CREATE VIEW analytics.review_sentiment_demographics AS
SELECT r.id AS review_id,
       r.user_id,
       s.sentiment,
       extract(year FROM d.birth_date)::integer AS birth_year,
       d.gender,
       d.city AS location
FROM public.reviews AS r
JOIN analytics.review_sentiment AS s ON s.review_id = r.id
JOIN public.user_demographics AS d ON d.user_id = r.user_id;

-- Dashboards.
CREATE VIEW analytics.restaurant_scorecard AS
SELECT rs.id AS restaurant_id,
       rs.name,
       rs.cuisine,
       rs.city,
       count(r.id) AS reviews,
       round(avg(r.rating), 2) AS avg_rating,
       round(avg((s.sentiment = 'positive')::integer), 3) AS positive_share
FROM public.restaurants AS rs
LEFT JOIN public.reviews AS r ON r.restaurant_id = rs.id
LEFT JOIN analytics.review_sentiment AS s ON s.review_id = r.id
GROUP BY rs.id, rs.name, rs.cuisine, rs.city;

CREATE VIEW analytics.monthly_review_kpis AS
SELECT date_trunc('month', r.created_at AT TIME ZONE 'UTC')::date AS month,
       count(*) AS reviews,
       count(DISTINCT r.user_id) AS reviewers,
       round(avg(r.rating), 2) AS avg_rating,
       round(avg((s.sentiment = 'positive')::integer), 3) AS positive_share
FROM public.reviews AS r
JOIN analytics.review_sentiment AS s ON s.review_id = r.id
GROUP BY 1;

------------------------------------------------------------------------------------------------
-- Test data (schema mock): what software engineers build and debug against.
------------------------------------------------------------------------------------------------

CREATE SCHEMA mock;

CREATE TABLE mock.users (LIKE public.users INCLUDING ALL);
CREATE TABLE mock.restaurants (LIKE public.restaurants INCLUDING ALL);
CREATE TABLE mock.reviews (LIKE public.reviews INCLUDING ALL);

INSERT INTO mock.users
SELECT i, 'Test User ' || i, 'user' || i || '@example.test', 'not-a-real-hash',
       '+1 555 0100 ' || lpad(i::text, 4, '0'), 'us', false,
       timestamptz '2024-01-01 00:00:00+00' + make_interval(days => i)
FROM generate_series(1, 50) AS i;

INSERT INTO mock.restaurants
SELECT i, 'Test Restaurant ' || i, 'italian', 'Testville', 'us', 2, date '2020-01-01'
FROM generate_series(1, 10) AS i;

INSERT INTO mock.reviews
SELECT i, 1 + (i % 50), 1 + (i % 10), 1 + (i % 5)::smallint, 'Test review ' || i,
       timestamptz '2024-02-01 00:00:00+00' + make_interval(hours => i)
FROM generate_series(1, 200) AS i;

ANALYZE;

------------------------------------------------------------------------------------------------
-- Demo logins. PostgreSQL grants every demo login read access to the data; pgveil's policy
-- (policies/reviews.yaml) decides what each of them actually gets to see. The database must
-- only be reachable through pgveil.
------------------------------------------------------------------------------------------------

DO $$
DECLARE
  login text;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reviews_demo_reader') THEN
    CREATE ROLE reviews_demo_reader NOLOGIN;
  END IF;
  FOREACH login IN ARRAY ARRAY['dana_scientist', 'sam_security', 'sven_engineer',
                               'mia_marketing', 'pete_product', 'erin_exec'] LOOP
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = login) THEN
      EXECUTE format('CREATE ROLE %I LOGIN', login);
    END IF;
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', login, 'demo-' || split_part(login, '_', 1));
    EXECUTE format('GRANT reviews_demo_reader TO %I', login);
  END LOOP;
END
$$;

GRANT USAGE ON SCHEMA public, analytics, mock TO reviews_demo_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public, analytics, mock TO reviews_demo_reader;
GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA mock TO reviews_demo_reader;
