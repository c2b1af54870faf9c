"""Schema of the ledger, as numbered migrations (PRAGMA user_version).

One append-only table, ``facts``, ordered by one global sequence. Columns an auditor
filters on are real columns; the rest of a fact lives in ``data`` (canonical JSON).
Triggers refuse every UPDATE and DELETE (and so every upsert), and every INSERT
that does not extend the sequence (so INSERT OR REPLACE cannot rewrite history).
Views present the facts to people; they are documentation you can query.
"""

from __future__ import annotations

APPLICATION_ID = 0x4C424F54  # "LBOT": marks a file as our ledger

ISO = "strftime('%Y-%m-%dT%H:%M:%fZ', {col} / 1000.0, 'unixepoch')"


def iso(col: str) -> str:
    return ISO.format(col=col)


FACTS_TABLE = """
CREATE TABLE facts (
    seq               INTEGER PRIMARY KEY,   -- one global order of all facts
    ts                INTEGER NOT NULL,      -- UTC milliseconds, from the bot's clock
    type              TEXT NOT NULL,         -- see ledger/facts.py FACT_TYPES
    run_id            TEXT,                  -- the job run that recorded it
    symbol            TEXT,
    side              TEXT,                  -- buy|sell for orders, long|short for positions
    amount            TEXT,                  -- decimal strings, exactly as sent/received
    price             TEXT,
    fee               TEXT,
    pnl               TEXT,
    position_id       TEXT,
    client_order_id   TEXT,
    exchange_order_id TEXT,
    reason            TEXT,
    data              TEXT NOT NULL,         -- canonical JSON of the rest of the fact
    hash              BLOB NOT NULL          -- sha256(previous hash || canonical(row))
)
"""

TRIGGERS = """
CREATE TRIGGER facts_no_update BEFORE UPDATE ON facts
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER facts_no_delete BEFORE DELETE ON facts
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE refused'); END;
CREATE TRIGGER facts_append_only BEFORE INSERT ON facts
WHEN NEW.seq IS NULL OR NEW.seq <= (SELECT ifnull(max(seq), 0) FROM facts)
BEGIN SELECT RAISE(ABORT, 'ledger is append-only: a new fact must extend the sequence'); END;
"""

# Only partial indexes on the columns few rows carry: every index entry costs each
# append, and appends must stay fast (fsync already dominates a commit).
INDEXES = """
CREATE INDEX facts_client_order ON facts(client_order_id) WHERE client_order_id IS NOT NULL;
CREATE INDEX facts_position ON facts(position_id) WHERE position_id IS NOT NULL;
"""

# When a position closed: its data.closed_ts (the exchange's time of its last fill) if
# that is before it was recorded, else when recorded. facts.happened_ms is its twin;
# json_type, not typeof, so that a JSON true is not taken for 1.
CLOSED_MS = """CASE WHEN json_type({t}.data, '$.closed_ts') = 'integer'
          AND json_extract({t}.data, '$.closed_ts') > 0
          AND json_extract({t}.data, '$.closed_ts') < {t}.ts
     THEN json_extract({t}.data, '$.closed_ts') ELSE {t}.ts END"""


def closed_ms(table: str = "facts") -> str:
    return CLOSED_MS.format(t=table)


# The day a close counts on: its data.day (decided when it was recorded, see
# facts.counting_day), else the day it was recorded. facts.recorded_day is its twin.
RECORDED_DAY = "strftime('%Y-%m-%d', ts / 1000, 'unixepoch')"
CLOSE_DAY = f"""CASE WHEN json_type(data, '$.day') = 'text'
          AND json_extract(data, '$.day') GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'
     THEN json_extract(data, '$.day') ELSE {RECORDED_DAY} END"""


def daily_totals(day: str) -> str:
    """daily_pnl's totals per UTC day, a close counting on the ``day`` expression's."""
    return f"""WITH closes AS (
    SELECT {day} AS day,
           count(*) AS trades,
           sum(CAST(pnl AS REAL) > 0) AS wins,
           round(sum(CAST(pnl AS REAL)), 8) AS realized_pnl,
           round(sum(CAST(fee AS REAL)), 8) AS fees
    FROM facts WHERE type = 'position_closed' GROUP BY day),
equity AS (  -- the last day_close of each day (SQLite: bare columns follow max())
    SELECT json_extract(data, '$.day') AS day, json_extract(data, '$.equity') AS equity,
           max(seq)
    FROM facts WHERE type = 'day_close' GROUP BY 1)"""


# A closed trade's size: the last exit's, after partial exits.
CLOSED_AMOUNT = """coalesce(c.amount,
                (SELECT p.amount FROM facts p WHERE p.type = 'position_changed'
                   AND p.position_id = c.position_id ORDER BY p.seq DESC LIMIT 1),
                o.amount)"""

VIEWS = f"""
CREATE VIEW ledger AS
SELECT seq, {iso('ts')} AS time, type, symbol, side, amount, price, fee, pnl, position_id,
       client_order_id, exchange_order_id, reason, run_id, data, lower(hex(hash)) AS hash
FROM facts;

CREATE VIEW open_positions AS
SELECT o.position_id, o.symbol, o.side,
       coalesce((SELECT c.amount FROM facts c WHERE c.type = 'position_changed'
                 AND c.position_id = o.position_id ORDER BY c.seq DESC LIMIT 1), o.amount)
         AS amount,
       coalesce((SELECT c.price FROM facts c WHERE c.type = 'position_changed'
                 AND c.position_id = o.position_id ORDER BY c.seq DESC LIMIT 1), o.price)
         AS entry_price,
       (SELECT b.price FROM facts b WHERE b.type = 'best_price'
          AND b.position_id = o.position_id ORDER BY b.seq DESC LIMIT 1) AS best_price,
       (SELECT s.price FROM facts s WHERE s.type IN ('stop_placed', 'stop_moved')
          AND s.position_id = o.position_id ORDER BY s.seq DESC LIMIT 1) AS stop_price,
       {iso('o.ts')} AS opened_at, o.seq AS opened_seq
FROM facts o
WHERE o.type = 'position_opened'
  AND NOT EXISTS (SELECT 1 FROM facts c WHERE c.type = 'position_closed'
                  AND c.position_id = o.position_id);

CREATE VIEW closed_trades AS
SELECT c.position_id, c.symbol, o.side,
       {CLOSED_AMOUNT} AS amount,
       o.price AS entry_price, c.price AS exit_price,
       c.fee AS fees, c.pnl AS realized_pnl, c.reason AS exit_reason,
       {iso('o.ts')} AS opened_at, {iso('c.ts')} AS closed_at,
       round((c.ts - o.ts) / 1000.0, 3) AS duration_s,
       o.seq AS opened_seq, c.seq AS closed_seq
FROM facts c
JOIN facts o ON o.type = 'position_opened' AND o.position_id = c.position_id
WHERE c.type = 'position_closed';

CREATE VIEW orders_timeline AS
SELECT seq, {iso('ts')} AS time, client_order_id, exchange_order_id, symbol, side, type AS event,
       CASE type WHEN 'order_intent' THEN 'intent'
                 WHEN 'order_submitted' THEN 'submitted'
                 WHEN 'fill' THEN 'fill'
                 ELSE json_extract(data, '$.state') END AS state,
       amount, price, fee, json_extract(data, '$.purpose') AS purpose, reason, position_id
FROM facts
WHERE type IN ('order_intent', 'order_submitted', 'order_update', 'fill')
ORDER BY seq;

CREATE VIEW daily_pnl AS
{daily_totals(RECORDED_DAY)}
SELECT c.day, c.trades, c.wins, c.realized_pnl, c.fees, e.equity AS closing_equity
FROM closes c LEFT JOIN equity e ON e.day = c.day
ORDER BY c.day;

CREATE VIEW job_runs AS
SELECT seq, json_extract(data, '$.job') AS job,
       {iso("json_extract(data, '$.scheduled_ms')")} AS scheduled_for,
       {iso("json_extract(data, '$.started_ms')")} AS started_at,
       json_extract(data, '$.duration_ms') AS duration_ms,
       json_extract(data, '$.outcome') AS outcome,
       reason AS error, run_id
FROM facts
WHERE type = 'job_run'
ORDER BY seq;

CREATE VIEW risk_events AS
SELECT seq, {iso('ts')} AS time, type, symbol, side, amount, reason,
       json_extract(data, '$.detail') AS detail
FROM facts
WHERE (type = 'risk_decision' AND json_extract(data, '$.approved') = 0)
   OR type IN ('halt', 'resume')
ORDER BY seq;

CREATE VIEW reconciliations AS
SELECT seq, {iso('ts')} AS time, json_extract(data, '$.status') AS status,
       json_array_length(data, '$.differences') AS differences,
       json_array_length(data, '$.corrections') AS corrections,
       json_extract(data, '$.dry_run') AS dry_run, data
FROM facts
WHERE type = 'reconcile_run'
ORDER BY seq;

CREATE VIEW balances AS
SELECT seq, {iso('ts')} AS time, json_extract(data, '$.currency') AS currency,
       json_extract(data, '$.total') AS total, json_extract(data, '$.free') AS free,
       json_extract(data, '$.equity') AS equity
FROM facts
WHERE type = 'balance'
ORDER BY seq;
"""

# Migration 2: views that agree with the fold. open_positions: the entry price of the
# last change that carries one (a partial exit carries none), the stop unless cancelled
# since, the best price from the entry until one is recorded; closed_trades: the average
# entry its PnL was computed from.
POSITION_ENTRY = """coalesce((SELECT c.price FROM facts c WHERE c.type = 'position_changed'
                 AND c.position_id = o.position_id AND c.price IS NOT NULL
                 ORDER BY c.seq DESC LIMIT 1), o.price)"""


def closed_trades(closed: str) -> str:
    """The closed_trades view (migration 2 on), closed when ``closed`` says."""
    return f"""
DROP VIEW closed_trades;
CREATE VIEW closed_trades AS
SELECT c.position_id, c.symbol, o.side,
       {CLOSED_AMOUNT} AS amount,
       coalesce(json_extract(c.data, '$.entry_price'), o.price) AS entry_price,
       c.price AS exit_price,
       c.fee AS fees, c.pnl AS realized_pnl, c.reason AS exit_reason,
       {iso('o.ts')} AS opened_at, {iso(closed)} AS closed_at,
       round(({closed} - o.ts) / 1000.0, 3) AS duration_s,
       o.seq AS opened_seq, c.seq AS closed_seq
FROM facts c
JOIN facts o ON o.type = 'position_opened' AND o.position_id = c.position_id
WHERE c.type = 'position_closed';
"""


VIEWS_2 = f"""
DROP VIEW open_positions;
CREATE VIEW open_positions AS
SELECT o.position_id, o.symbol, o.side,
       coalesce((SELECT c.amount FROM facts c WHERE c.type = 'position_changed'
                 AND c.position_id = o.position_id ORDER BY c.seq DESC LIMIT 1), o.amount)
         AS amount,
       {POSITION_ENTRY} AS entry_price,
       coalesce((SELECT b.price FROM facts b WHERE b.type = 'best_price'
                 AND b.position_id = o.position_id ORDER BY b.seq DESC LIMIT 1),
                {POSITION_ENTRY}) AS best_price,
       (SELECT CASE WHEN EXISTS (SELECT 1 FROM facts x WHERE x.type = 'stop_cancelled'
                                 AND x.client_order_id = s.client_order_id
                                 AND x.seq > s.seq) THEN NULL ELSE s.price END
          FROM facts s WHERE s.type IN ('stop_placed', 'stop_moved')
          AND s.position_id = o.position_id ORDER BY s.seq DESC LIMIT 1) AS stop_price,
       {iso('o.ts')} AS opened_at, o.seq AS opened_seq
FROM facts o
WHERE o.type = 'position_opened'
  AND NOT EXISTS (SELECT 1 FROM facts c WHERE c.type = 'position_closed'
                  AND c.position_id = o.position_id);
{closed_trades("c.ts")}"""

def daily_pnl(day: str) -> str:
    """The daily_pnl view (migration 3 on), a close counting on the ``day`` expression's.

    Every UTC day the ledger closed is listed, also one without a closed trade (its loss
    or gain was in positions still open, or in partial exits, which count on their
    position's close day): its closing equity says what happened."""
    return f"""
DROP VIEW daily_pnl;
CREATE VIEW daily_pnl AS
{daily_totals(day)},
days AS (SELECT day FROM closes UNION SELECT day FROM equity WHERE typeof(day) = 'text')
SELECT d.day, coalesce(c.trades, 0) AS trades, coalesce(c.wins, 0) AS wins,
       coalesce(c.realized_pnl, 0) AS realized_pnl, coalesce(c.fees, 0) AS fees,
       e.equity AS closing_equity
FROM days d LEFT JOIN closes c ON c.day = d.day LEFT JOIN equity e ON e.day = d.day
ORDER BY d.day;
"""


VIEWS_3 = daily_pnl(RECORDED_DAY)

# Migration 4: a stop that fired before midnight while the bot was down, recorded after,
# counts on the day it fired (it counted on the day it was recorded), and closed_trades
# shows when it closed on the exchange.
VIEWS_4 = daily_pnl(CLOSE_DAY) + closed_trades(closed_ms("c"))

VIEW_NAMES = ("ledger", "open_positions", "closed_trades", "orders_timeline", "daily_pnl",
              "job_runs", "risk_events", "reconciliations", "balances")

# Each migration is a script run inside one transaction. Never edit a released one:
# append a new one. The list index + 1 is the schema version.
MIGRATIONS: tuple[str, ...] = (
    FACTS_TABLE + ";" + TRIGGERS + INDEXES + VIEWS,
    VIEWS_2,
    VIEWS_3,
    VIEWS_4,
)

SCHEMA_VERSION = len(MIGRATIONS)
