"""The careful exchange client: every call the bot makes to an exchange goes through here.

``ExchangeClient(raw, config, clock)`` wraps a raw venue (a real ``ccxt.binanceusdm`` from
``build_ccxt``, or ``core.sim_exchange.SimExchange``) and adds, once for both:

* one lock around the raw venue (a ccxt instance and its throttle are not thread-safe);
* bounded retries of reads on network-class errors, exponential backoff with jitter, each
  retry logged; the sleep is injectable so tests and backtests never wait;
* submission that is never retried blindly: after an ambiguous error the order is looked up
  by the caller's client order id and the answer is accepted, rejected or unknown;
* the market's precision and minimums applied before anything is sent;
* only closed candles, judged by the exchange's clock and the timeframe;
* validation of everything the exchange says; bad payloads raise ``BadExchangeData`` after a
  log line with a short summary, so the caller skips the affected decision.

How a failed ``create_order`` is classified (ccxt 4.5 exception classes, Binance codes):

============================================  ========================================
not processed -> ``rejected``                 DDoSProtection / RateLimitExceeded (HTTP 418,
                                              429, -1003, -1015: refused at the gateway),
                                              InvalidNonce (-1021: refused before matching)
ambiguous -> look up by client id             RequestTimeout (-1007, read timeout),
                                              ExchangeNotAvailable (5xx), other NetworkError,
                                              OperationFailed (-1000, -1001, -1006, -1008,
                                              BadResponse), -4116 duplicate client id,
                                              an unusable success response, any non-ccxt error
refused -> ``rejected``                       every other ccxt error: InsufficientFunds
                                              (-2019), InvalidOrder (-4164, ...), BadRequest,
                                              AuthenticationError, ...
============================================  ========================================
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import ccxt

from core.clock import DAY_MS, iso, timeframe_ms
from core.config import Config, Secrets
from core.exchange_types import (
    LONGEST_IP_BAN_MS,
    BadExchangeData,
    BalanceReport,
    Candle,
    FillReport,
    MarketInfo,
    OrderReport,
    OrderRequest,
    PositionReport,
    SubmitResult,
    Ticker,
)
from core.orders import CLIENT_ID_RE

log = logging.getLogger(__name__)

SERVER_TIME_REFRESH_MS = 60_000  # re-measure the exchange clock offset this often
MAX_BACKOFF_S = 30.0
RATE_LIMIT_BACKOFF_FACTOR = 4  # a 429 asks for a longer pause than a dropped packet
IP_BANNED_STATUS = 418  # Binance: banned for calling on after 429s; never retried
SHORTEST_BAN_S = 120.0  # Binance's first ban lasts 2 minutes (then up to 3 days)
BANNED_UNTIL_RE = re.compile(r"banned until (\d{13})")
LOOKUP_ATTEMPTS = 3  # lookups by client id after an ambiguous submission
# Binance can answer an order (NEW, nothing filled yet) before a lookup finds it (-2013).
# Lookups of an order just accepted go on this many times (backing off: a few seconds in
# all) before its outcome is left to reconcile, minutes later, with a position unprotected.
VISIBLE_ATTEMPTS = 5
# A regular order still absent this long after it was sent never reached the book: Binance
# refuses requests older than recvWindow (10 s in ccxt), also in the matching engine (-5028).
NOT_FOUND_FINAL_MS = 60_000
# Binance forgets cancelled/expired unfilled orders after 3 days: absence proves nothing then.
FORGOTTEN_AFTER_MS = 3 * DAY_MS
FILLS_PAGE = 1000
FILLS_MAX_PAGES = 50
BINANCE_TRADES_WINDOW_MS = 7 * DAY_MS  # userTrades serves at most 7 days per query
SUMMARY_CHARS = 240

ORDER_STATUSES = {"open": "open", "closed": "closed", "canceled": "canceled",
                  "expired": "expired", "rejected": "rejected",
                  "canceling": "open"}  # a cancel in flight: the order still lives

# Binance's algo service: the stop met its trigger (TRIGGERING: being passed to the
# matching engine; TRIGGERED: placed there; FINISHED: that order is done).
FIRED_ALGO_STATUSES = frozenset({"TRIGGERING", "TRIGGERED", "FINISHED"})
NOT_PROCESSED = (ccxt.DDoSProtection, ccxt.RateLimitExceeded, ccxt.InvalidNonce)
DUPLICATE_CLIENT_ID_CODE = "-4116"
MARGIN_MODE_UNCHANGED_CODE = "-4046"


def build_ccxt(config: Config, secrets: Secrets | None = None):
    """The real ccxt exchange object, configured for careful use (keys never logged)."""
    secrets = config.secrets if secrets is None else secrets
    cls = getattr(ccxt, config.exchange.id)  # the config allows binanceusdm only
    settings: dict[str, Any] = {
        "timeout": config.exchange.timeout_ms,
        "enableRateLimit": True,
        "options": {
            "defaultType": "swap",
            "fetchCurrencies": False,  # with keys it would call a spot-wallet endpoint
            "adjustForTimeDifference": True,  # sync with the server clock on load_markets
            "maxRetriesOnFailure": 0,  # retries are ours, and never for orders
            "warnOnFetchOpenOrdersWithoutSymbol": False,  # reconciliation lists all symbols
        },
        "enableLastJsonResponse": True,  # positions() checks what ccxt may have skipped
    }
    if secrets.api_key and secrets.api_secret:
        settings["apiKey"] = secrets.api_key
        settings["secret"] = secrets.api_secret
    raw = cls(settings)
    # ccxt logs request headers (X-MBX-APIKEY) at DEBUG: keep only method and path.
    raw.logger = _HeaderlessLogger(logging.getLogger("ccxt.base.exchange"))
    if config.exchange.demo:
        raw.enable_demo_trading(True)
    return raw


class _HeaderlessLogger:
    """Stands in for ccxt's logger: request/response debug lines lose headers and bodies."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def debug(self, msg: str, *args: Any) -> None:
        method = args[0] if args else "?"
        url = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        self._logger.debug("%s %s", method, urlsplit(url).path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class IpBanned(ccxt.DDoSProtection):
    """Not called: the exchange banned this IP, and calling during a ban lengthens it."""

    @classmethod
    def until(cls, until_ms: int) -> IpBanned:
        return cls(f"not called: this IP is banned by the exchange until {iso(until_ms)}")


class IpBan:
    """When the exchange's ban of this IP ends (ms, our clock): one for all the clients of
    a runtime (they share the IP). Every call waits for it to end, whichever client's call
    was answered 418."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.until_ms = 0
        # Told of each ban answered (or lengthened): the runtime records it in the ledger,
        # so a restart does not call into the ban (each call lengthens it, up to 3 days).
        self.on_hold: Callable[[int], None] | None = None

    def hold(self, until_ms: int) -> None:
        with self._lock:
            longer = until_ms > self.until_ms
            self.until_ms = max(self.until_ms, until_ms)
        if longer and self.on_hold is not None:
            self.on_hold(until_ms)

    def check(self, now_ms: int) -> None:
        if self.active(now_ms):
            raise IpBanned.until(self.until_ms)

    def end_ms(self, exc: BaseException, now_ms: int, offset_ms: int = 0) -> int:
        """When a ban a 418 answer announces ends, by our clock: its Retry-After, else the
        time its message names (by the exchange's clock, ``offset_ms`` ahead of ours),
        else Binance's shortest ban from now."""
        after = _retry_after_s(exc)
        named = BANNED_UNTIL_RE.search(str(exc))
        if after is not None:  # in float first: 1e306 s in ms overflows an int
            end = now_ms + int(min(after * 1000, LONGEST_IP_BAN_MS))
        elif named and int(named.group(1)) - offset_ms > now_ms:
            end = int(named.group(1)) - offset_ms
        else:
            end = now_ms + int(SHORTEST_BAN_S * 1000)
        return min(end, now_ms + LONGEST_IP_BAN_MS)

    def active(self, now_ms: int) -> bool:
        return now_ms < self.until_ms


class ExchangeClient:
    """The only door to an exchange. See the module docstring for the rules it keeps.

    Reads raise ``BadExchangeData`` for payloads that cannot be trusted (already logged) and
    ccxt's exceptions when the venue stays unreachable after the bounded retries.
    """

    def __init__(self, raw: Any, config: Config, clock: Any,
                 sleep: Callable[[float], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.raw = raw
        self._time_source: ExchangeClient | None = None
        self._time_lock = threading.Lock()
        self.config = config
        self.settings = config.exchange
        self.clock = clock
        self._sleep = clock.sleep if sleep is None else sleep
        self._rng = random.Random() if rng is None else rng
        self._lock = threading.RLock()
        self.ban = IpBan()  # runtime.build gives all of a runtime's clients one
        self._configured: set[str] = set()
        self._offset_ms: int | None = None
        self._offset_measured_at: int | None = None

    # ---- markets -------------------------------------------------------------------

    def load_markets(self, reload: bool = False) -> list[str]:
        """Load the venue's markets; return the tradable symbols settled in our quote."""
        markets = self._retrying("load_markets", self.raw.load_markets, *([True] if reload else []))
        if not isinstance(markets, dict) or not markets:
            raise self._bad("load_markets", "no markets", markets)
        return sorted(_tradable(markets, self.settings.quote))

    def market(self, symbol: str) -> MarketInfo:
        """Precision and limits of one market; BadExchangeData for an unknown symbol."""
        m = self._market_dict(symbol)
        try:
            precision = m.get("precision") or {}
            limits = m.get("limits") or {}
            maxima = [_decimal((limits.get(kind) or {}).get("max"), f"max {kind}",  # 0: none
                               required=False, nonneg=True) for kind in ("amount", "market")]
            return MarketInfo(
                symbol=symbol,
                base=str(m.get("base")),
                quote=str(m.get("quote")),
                amount_step=self._step(precision.get("amount")),
                price_step=self._step(precision.get("price")),
                min_amount=_decimal((limits.get("amount") or {}).get("min"), "min amount",
                                    required=False, nonneg=True),
                min_notional=_decimal((limits.get("cost") or {}).get("min"), "min notional",
                                      required=False, nonneg=True),
                contract_size=_decimal(m.get("contractSize"), "contract size", required=False,
                                       positive=True) or Decimal(1),
                max_amount=min((mx for mx in maxima if mx), default=None),
                taker_fee=_decimal(m.get("taker"), "taker fee", required=False, nonneg=True),
            )
        except BadExchangeData as exc:
            raise self._bad(f"market {symbol}", str(exc), m) from None

    def prepare_amount(self, symbol: str, amount: Decimal | float | str,
                       price: Decimal | float | str | None, reduce_only: bool = False,
                       clamp: bool = False) -> tuple[Decimal | None, str]:
        """Amount truncated to the market's step and checked against its limits.

        Returns (amount, "") or (None, reason). ``price`` is the expected fill price for the
        notional check; reduce-only orders are exempt from the minimum notional (Binance
        -4164: "unless you choose reduce only"). ``clamp``: above the maximum, the maximum
        (a reduce-only market order: the rest is a partial exit) instead of a refusal.
        """
        try:
            info = self.market(symbol)
            wanted = _decimal(amount, "amount", positive=True)
        except BadExchangeData as exc:
            return None, str(exc)
        try:
            text = self._local(self.raw.amount_to_precision, symbol, float(wanted))
            rounded = _decimal(text, "rounded amount", positive=True)
        except (ccxt.BaseError, BadExchangeData):
            return None, f"amount {wanted} rounds to zero at step {info.amount_step}"
        if info.min_amount is not None and rounded < info.min_amount:
            return None, f"amount {rounded} below the minimum {info.min_amount} of {symbol}"
        if info.max_amount is not None and rounded > info.max_amount:
            # Risk sizing caps entries, so only a position grown or adopted from outside
            # gets here. Never send what -4005 refuses; never a stop that covers only part
            # of its position while the ledger calls the position protected.
            if not (clamp and reduce_only):
                return None, f"amount {rounded} above the maximum {info.max_amount} of {symbol}"
            log.warning("%s: reduce-only amount %s above the maximum %s; sending the maximum",
                        symbol, rounded, info.max_amount)
            rounded = info.max_amount
        if not reduce_only and info.min_notional:
            try:
                px = _decimal(price, "price", positive=True)
            except BadExchangeData:
                return None, f"no valid price ({price!r}) to check the minimum notional"
            notional = rounded * px * info.contract_size
            if notional < info.min_notional:
                return None, (f"notional {notional.normalize():f} below the minimum "
                              f"{info.min_notional} of {symbol}")
        return rounded, ""

    def prepare_price(self, symbol: str, price: Decimal | float | str) -> Decimal:
        """A price on the market's tick, as ``price_to_precision`` rounds it."""
        wanted = _decimal(price, "price", positive=True)
        text = self._local(self.raw.price_to_precision, symbol, float(wanted))
        return _decimal(text, "rounded price", positive=True)

    def account_mode_problem(self) -> str | None:
        """Why this account cannot be traded as the bot trades, or None. It sends no
        ``positionSide`` (one-way mode) and reads equity from the settlement asset alone
        (single-asset margin); a venue without these endpoints (simulated) is neither."""
        checks = (
            ("fapiPrivateGetPositionSideDual", "dualSidePosition",
             "the account is in hedge mode (dual side position); switch it to one-way mode"),
            ("fapiPrivateGetMultiAssetsMargin", "multiAssetsMargin",
             "the account is in Multi-Assets margin mode; switch it to single-asset mode "
             f"(equity is read from {self.settings.quote} alone)"),
        )
        for method, key, why in checks:
            call = getattr(self.raw, method, None)
            if call is None:
                continue
            answer = self._retrying(method, call)
            value = answer.get(key) if isinstance(answer, dict) else None
            if value in (True, "true"):
                return why
            if value not in (False, "false"):
                raise self._bad(method, f"{key} missing or not a boolean", answer)
        return None

    def ensure_symbol_settings(self, symbol: str) -> None:
        """Margin mode and leverage from config, set once per symbol (idempotent).

        "No need to change margin type" (-4046) is success. Anything else raises, and the
        symbol is tried again next time, so the caller skips the entry.
        """
        if symbol in self._configured:
            return
        self._market_dict(symbol)
        mode, leverage = self.settings.margin_mode, self.settings.leverage
        try:
            self._retrying(f"set_margin_mode {symbol}", self.raw.set_margin_mode, mode, symbol)
        except ccxt.MarginModeAlreadySet:
            pass
        except ccxt.ExchangeError as exc:
            if MARGIN_MODE_UNCHANGED_CODE not in str(exc):
                raise
        self._retrying(f"set_leverage {symbol}", self.raw.set_leverage, leverage, symbol)
        self._configured.add(symbol)
        log.info("%s: margin mode %s, leverage %dx", symbol, mode, leverage)

    # ---- market data ---------------------------------------------------------------

    def share_clock(self, keeper: ExchangeClient) -> None:
        """Take the venue's clock from ``keeper`` (clients of one venue: one measurement)."""
        self._time_source = keeper

    def server_now_ms(self) -> int:
        """The exchange's clock: its offset from ours, measured at most once a minute.

        Measured against our clock once the answer is back, so the reading is late by the
        answer's way back (and never early by waits, retries or the request's way out): a
        candle that has only just closed may count as forming for a moment, the safe
        direction; a forming one never counts as closed.
        """
        if self._time_source is not None:
            return self._time_source.server_now_ms()
        with self._time_lock:  # concurrent callers wait for one measurement
            now = self.clock.now_ms()
            stale = (self._offset_measured_at is None
                     or abs(now - self._offset_measured_at) >= SERVER_TIME_REFRESH_MS)
            if stale:
                server = self._retrying("fetch_time", self.raw.fetch_time)
                server_ms = _timestamp(server)
                if server_ms is None:
                    raise self._bad("fetch_time", "not a timestamp", server)
                now = self.clock.now_ms()
                self._offset_ms = server_ms - now
                self._offset_measured_at = now
            return now + self._offset_ms

    def _known_offset_ms(self) -> int:
        """The exchange's clock minus ours, as last measured (0 if never)."""
        keeper = self._time_source or self
        return keeper._offset_ms or 0

    def banned(self) -> bool:
        """Is this IP banned now (no call would go out)?"""
        return self.ban.active(self.clock.now_ms())

    def closed_candles(self, symbol: str, timeframe: str, limit: int) -> list[Candle]:
        """The last ``limit`` (or fewer) closed candles, oldest first, validated.

        Rows with bad prices or volume, misaligned or duplicated timestamps are dropped (and
        logged); the order is repaired. BadExchangeData when nothing valid remains.
        """
        tf_ms = timeframe_ms(timeframe)
        self._market_dict(symbol)
        # One extra row: the forming candle that is about to be dropped.
        rows = self._retrying(f"fetch_ohlcv {symbol} {timeframe}", self.raw.fetch_ohlcv,
                              symbol, timeframe, None, limit + 1)
        server_now = self.server_now_ms()
        candles, problems = clean_candles(rows, tf_ms, server_now)
        what = f"candles {symbol} {timeframe}"
        if problems:
            log.warning("%s: %s (of %d rows); raw: %s", what, _counts(problems),
                        len(rows) if isinstance(rows, list) else 0, summarize(rows))
        if not candles:
            raise self._bad(what, "no valid closed candle", rows)
        return candles[-limit:]

    def tickers(self) -> dict[str, Ticker]:
        """24 h tickers of our tradable markets; invalid or unknown rows dropped (and logged)."""
        raw = self._retrying("fetch_tickers", self.raw.fetch_tickers)
        if not isinstance(raw, dict):
            raise self._bad("fetch_tickers", "not a mapping", raw)
        markets = self._markets()
        tradable = _tradable(markets, self.settings.quote)
        out: dict[str, Ticker] = {}
        dropped: list[str] = []
        for symbol, t in raw.items():
            if symbol not in markets:
                dropped.append(f"{symbol}: unknown symbol")
                continue
            if symbol not in tradable:
                continue  # another settlement currency or product: not ours
            try:
                out[symbol] = self._ticker(symbol, t)
            except BadExchangeData as exc:
                dropped.append(f"{symbol}: {exc}")
        if dropped:
            log.warning("tickers: dropped %d of %d: %s", len(dropped), len(raw),
                        _clip("; ".join(dropped)))
        if not out:
            raise self._bad("tickers", "no valid ticker", raw)
        return out

    # ---- account -------------------------------------------------------------------

    def balance(self) -> BalanceReport:
        """Balance of the quote currency. total = wallet balance, equity = margin balance."""
        raw = self._retrying("fetch_balance", self.raw.fetch_balance)
        quote = self.settings.quote
        try:
            if not isinstance(raw, dict):
                raise BadExchangeData("not a mapping")
            entry = raw.get(quote)
            if not isinstance(entry, dict):
                raise BadExchangeData(f"no {quote} entry")
            free = _decimal(entry.get("free"), f"{quote} free")
            used = _decimal(entry.get("used"), f"{quote} used")
            total = _decimal(entry.get("total"), f"{quote} total")
            # ccxt's Binance total is the margin balance; the wallet balance is in the raw
            # per-asset row. A venue without such a row: wallet = equity = total.
            wallet, equity = total, total
            asset = _info_asset(raw.get("info"), quote)
            if asset is not None:
                wallet = _decimal(asset.get("walletBalance"), f"{quote} walletBalance")
                equity = _decimal(asset.get("marginBalance"), f"{quote} marginBalance")
        except BadExchangeData as exc:
            raise self._bad("balance", str(exc), raw) from None
        return BalanceReport(currency=quote, total=wallet, free=free, used=used, equity=equity)

    def positions(self) -> list[PositionReport]:
        """Open positions. One invalid row invalidates the whole answer."""
        raw, body = self._retrying("fetch_positions", self._fetch_positions_and_body)
        if not isinstance(raw, list):
            raise self._bad("positions", "not a list", raw)
        out = []
        for p in raw:
            try:
                report = self._position(p)
            except BadExchangeData as exc:
                raise self._bad("positions", str(exc), p) from None
            if report is not None:
                out.append(report)
        # ccxt silently skips Binance rows whose entryPrice is not > 0: a position that
        # vanished that way must not read as "flat".
        open_rows = _open_binance_position_rows(body)
        if open_rows is not None and open_rows != len(out):
            raise self._bad("positions", f"{open_rows} open in the raw answer, {len(out)} "
                            f"parsed", body)
        return out

    def _fetch_positions_and_body(self) -> tuple[Any, Any]:
        with self._lock:
            if hasattr(self.raw, "last_json_response"):
                self.raw.last_json_response = None  # never judge by a stale body
            parsed = self.raw.fetch_positions()
            return parsed, getattr(self.raw, "last_json_response", None)

    def open_orders(self, symbol: str | None = None) -> list[OrderReport]:
        """Open regular orders and open trigger (stop) orders, all symbols when None."""
        regular = self._retrying("fetch_open_orders", self.raw.fetch_open_orders, symbol)
        trigger = self._retrying("fetch_open_orders trigger", self.raw.fetch_open_orders,
                                 symbol, None, None, {"trigger": True})
        return (self._order_list("open orders", regular, trigger=False)
                + self._order_list("open trigger orders", trigger, trigger=True))

    def order_by_client_id(self, symbol: str, client_order_id: str,
                           trigger: bool = False) -> OrderReport | None:
        """The exchange's view of one order, or None when the exchange does not know it."""
        return self._lookup(symbol, client_order_id, None, trigger)

    def order_after_submit(self, symbol: str, client_order_id: str) -> OrderReport | None:
        """order_by_client_id for a regular order just accepted, looked up again after
        short pauses while the exchange does not show it yet; None if it stays unseen."""
        for attempt in range(VISIBLE_ATTEMPTS):
            if attempt:
                log.info("order %s: not shown yet; looking again", client_order_id)
                self._sleep(self._backoff_s(attempt, None))
            report = self._lookup(symbol, client_order_id, None, trigger=False)
            if report is not None:
                return report
        return None

    def fills(self, symbol: str, since_ms: int) -> list[FillReport]:
        """Account trades in ``symbol`` from ``since_ms`` on, oldest first, de-duplicated.
        ``since_ms`` is by our clock; the exchange stamps its trades by its own, so the
        search starts at ``since_ms`` by the exchange's clock (its measured offset added:
        a trade from before ``since_ms`` must not come back as a newer one)."""
        found: dict[str, FillReport] = {}
        server_now = self.server_now_ms()  # needed below anyway: free to read first
        since = since_ms + (server_now - self.clock.now_ms())
        for _ in range(FILLS_MAX_PAGES):
            batch = self._retrying(f"fetch_my_trades {symbol}", self.raw.fetch_my_trades,
                                   symbol, since, FILLS_PAGE)
            if not isinstance(batch, list):
                raise self._bad(f"fills {symbol}", "not a list", batch)
            for t in batch:
                try:
                    fill = self._fill(symbol, t)
                except BadExchangeData as exc:
                    raise self._bad(f"fills {symbol}", str(exc), t) from None
                found[fill.trade_id] = fill
            if len(batch) >= FILLS_PAGE:
                last = max(f.ts for f in found.values())
                if last <= since:
                    break
                since = last  # trades at `last` come again and are de-duplicated
                continue
            # A short page: done, unless Binance's 7-day window cut the answer off.
            if since + BINANCE_TRADES_WINDOW_MS >= server_now:
                break
            since += BINANCE_TRADES_WINDOW_MS
        return sorted(self._fees_valued(list(found.values())), key=lambda f: (f.ts, f.trade_id))

    def _fees_valued(self, fills: list[FillReport]) -> list[FillReport]:
        """Fees paid in another currency (Binance's BNB fee discount) valued in the
        settlement currency at that currency's last perpetual price, so fees and PnL are
        never sums of different currencies. Raises when it cannot be valued."""
        quote = self.settings.quote
        prices: dict[str, Decimal] = {}
        out = []
        for f in fills:
            if f.fee_currency == quote or f.fee == 0:  # nothing to value
                out.append(replace(f, fee_currency=quote))
                continue
            cur = f.fee_currency
            if cur not in prices:
                symbol = f"{cur}/{quote}:{quote}"
                if symbol not in self._markets():
                    raise self._bad(f"fills {f.symbol}", f"fee paid in {cur}: no {symbol} "
                                    "market to value it", f.trade_id)
                raw = self._retrying(f"fetch_ticker {symbol}", self.raw.fetch_ticker, symbol)
                try:
                    prices[cur] = self._ticker(symbol, raw).last
                except BadExchangeData as exc:
                    raise self._bad(f"fetch_ticker {symbol}", str(exc), raw) from None
            out.append(replace(f, fee=f.fee * prices[cur], fee_currency=quote,
                               fee_paid=(f.fee, cur, prices[cur])))
        return out

    # ---- orders --------------------------------------------------------------------

    def submit(self, req: OrderRequest, ref_price: Decimal | None = None) -> SubmitResult:
        """Send one order, never twice. accepted | rejected | unknown (reconcile later).

        ``ref_price`` is the expected fill price for the minimum-notional check of a market
        order (fetched from the tickers when omitted). The result's ``request`` is what was
        actually sent: amount and trigger price after the market's precision.
        """
        problem = _request_problem(req)
        if problem:
            return self._rejected_locally(req, problem)
        is_stop = req.type == "stop_market"
        check_price = req.trigger_price if is_stop else ref_price
        if check_price is None and not req.reduce_only:
            try:
                check_price = self.tickers()[req.symbol].last
            except (ccxt.BaseError, BadExchangeData, KeyError) as exc:
                return self._rejected_locally(req, f"no price to check the minimum notional "
                                                   f"({type(exc).__name__})")
        amount, reason = self.prepare_amount(req.symbol, req.amount, check_price,
                                             reduce_only=req.reduce_only,
                                             clamp=req.reduce_only and not is_stop)
        if amount is None:
            return self._rejected_locally(req, reason)
        params: dict[str, Any] = {"clientOrderId": req.client_order_id}
        trigger = None
        if is_stop:
            try:
                text = self._local(self.raw.price_to_precision, req.symbol,
                                   float(req.trigger_price))
                trigger = _decimal(text, "trigger price", positive=True)
            except (ccxt.BaseError, BadExchangeData) as exc:
                return self._rejected_locally(req, f"trigger price {req.trigger_price}: {exc}")
            params["triggerPrice"] = float(trigger)  # ccxt routes it to the algo endpoint
        if req.reduce_only:
            params["reduceOnly"] = True
        sent = replace(req, amount=amount, trigger_price=trigger)
        log.info("order %s: sending %s %s %s%s%s", req.client_order_id, req.side, amount,
                 req.symbol, f" trigger {trigger}" if trigger else "",
                 " reduce-only" if req.reduce_only else "")
        try:
            raw_order = self._call(self.raw.create_order, req.symbol, "market", req.side,
                                   float(amount), None, params)
        except NOT_PROCESSED as exc:
            if _may_have_executed(exc):
                return self._resolve_ambiguous(sent, exc)
            if isinstance(exc, ccxt.InvalidNonce):
                self._resync_time()
            note = error_text(exc)
            log.warning("order %s: not processed by the exchange: %s", req.client_order_id, note)
            return SubmitResult("rejected", sent, reason=f"not processed: {note}", errors=[note])
        except ccxt.OperationFailed as exc:  # NetworkError, timeouts, 5xx, BadResponse
            return self._resolve_ambiguous(sent, exc)
        except ccxt.BaseError as exc:
            if isinstance(exc, ccxt.DuplicateOrderId) or DUPLICATE_CLIENT_ID_CODE in str(exc) \
                    or _may_have_executed(exc):
                return self._resolve_ambiguous(sent, exc)
            note = error_text(exc)
            log.warning("order %s: rejected by the exchange: %s", req.client_order_id, note)
            return SubmitResult("rejected", sent, reason=note, errors=[note],
                                would_trigger=is_stop
                                and isinstance(exc, ccxt.OrderImmediatelyFillable))
        except Exception as exc:  # the request may have left: look it up
            return self._resolve_ambiguous(sent, exc)
        try:
            report = self._order_report(raw_order, trigger=is_stop)
            if report.client_order_id not in (None, req.client_order_id):
                raise BadExchangeData(f"answer names client id {report.client_order_id}")
        except BadExchangeData as exc:
            log.warning("order %s: unusable answer (%s); raw: %s", req.client_order_id, exc,
                        summarize(raw_order))
            return self._resolve_ambiguous(sent, exc)
        if report.client_order_id is None:  # the answer to our request carries our id
            report = replace(report, client_order_id=req.client_order_id)
        return self._from_report(sent, report, [])

    def resolve_unknown(self, req: OrderRequest, sent_at_ms: int) -> SubmitResult:
        """Settle an ``unknown`` submission later (reconciliation): look it up again.

        Found -> accepted/rejected per the exchange. Not found: a regular order is declared
        never placed once ``NOT_FOUND_FINAL_MS`` have passed (and before Binance may have
        forgotten it); a stop order stays unknown, because Binance's algo service has been
        seen to answer -2013 for orders that exist; reconcile stops against open orders.
        Read failures raise (the submission stays unknown).
        """
        is_stop = req.type == "stop_market"
        report = self._lookup(req.symbol, req.client_order_id, None, is_stop)
        if report is not None:
            return self._from_report(req, report, [])
        age = self.clock.now_ms() - sent_at_ms
        if not is_stop and NOT_FOUND_FINAL_MS <= age <= FORGOTTEN_AFTER_MS:
            reason = f"not on the exchange {age // 1000} s after sending: never placed"
            log.info("order %s: %s", req.client_order_id, reason)
            return SubmitResult("rejected", req, reason=reason)
        # Named by when it was sent, not how long ago: the same text every run, so a
        # standing difference is recorded once, not every reconciliation.
        return SubmitResult("unknown", req, reason=f"not found (sent {iso(sent_at_ms)})")

    def cancel(self, symbol: str, client_order_id: str | None = None,
               exchange_order_id: str | None = None, trigger: bool = False) -> OrderReport | None:
        """Cancel one order (``trigger=True`` for stop orders); the order as seen afterwards.

        Cancelling is idempotent, so network errors are retried. None when the exchange
        does not know the order at all.
        """
        if not client_order_id and not exchange_order_id:
            raise ValueError("cancel needs a client_order_id or an exchange_order_id")
        params: dict[str, Any] = {"clientOrderId": client_order_id} if client_order_id else {}
        if trigger:
            params["trigger"] = True
        name = client_order_id or exchange_order_id
        try:
            raw = self._retrying(f"cancel_order {name}", self.raw.cancel_order,
                                 None if client_order_id else exchange_order_id, symbol, params)
        except ccxt.OrderNotFound:  # already filled, cancelled or never placed: ask
            log.info("cancel %s: the exchange does not know it as open", name)
            raw = None
        report = None
        if isinstance(raw, dict):
            try:
                report = self._executed(self._order_report(raw, trigger=trigger))
            except BadExchangeData:
                report = None  # Binance's algo cancel answers only ids: look it up
        if report is None or report.status == "open":
            report = self._lookup(symbol, client_order_id, exchange_order_id, trigger)
        log.info("cancel %s: %s", name, report.status if report else "no such order")
        return report

    # ---- internals: calls and retries ----------------------------------------------

    def _local(self, fn: Callable, *args: Any) -> Any:
        """A ccxt helper that calls nobody (precision): not held back by a ban."""
        with self._lock:
            return fn(*args)

    def _call(self, fn: Callable, *args: Any) -> Any:
        with self._lock:  # checked under it: a call queued behind a 418 must not go out
            self.ban.check(self.clock.now_ms())
            try:
                return fn(*args)
            except ccxt.BaseError as exc:
                # ccxt's message holds a signed request's URL. Masked here, at the edge,
                # so no log line, traceback, job record or reconcile note can carry it.
                mask_signature(exc)
                if is_ip_ban(exc):
                    self.ban.hold(self.ban.end_ms(exc, self.clock.now_ms(),
                                                  self._known_offset_ms()))
                raise

    def _retrying(self, what: str, fn: Callable, *args: Any) -> Any:
        """A safe (read or idempotent) call, retried on network-class errors."""
        attempts = 1 + self.settings.read_retries
        for attempt in range(1, attempts + 1):
            try:
                return self._call(fn, *args)
            except (BadExchangeData, IpBanned):
                raise
            except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:
                # ccxt choked on the answer (e.g. "NaN" in a ticker): bad data, not a crash
                body = getattr(self.raw, "last_json_response", None)
                raise self._bad(what, f"the venue could not parse its answer "
                                f"({type(exc).__name__}: {_clip(str(exc), 80)})",
                                args if body is None else body) from None
            except ccxt.OperationFailed as exc:
                if is_ip_ban(exc):  # calling again lengthens the ban
                    log.error("%s: IP banned by the exchange; not retried: %s", what,
                              error_text(exc))
                    raise
                if attempt == attempts:
                    log.error("%s failed after %d attempts: %s", what, attempts, error_text(exc))
                    raise
                if isinstance(exc, ccxt.InvalidNonce):
                    self._resync_time()
                delay = self._backoff_s(attempt, exc)
                log.warning("%s failed (%s); retry %d of %d in %.2f s", what, error_text(exc),
                            attempt, attempts - 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _backoff_s(self, attempt: int, exc: BaseException | None) -> float:
        asked = _retry_after_s(exc) if exc is not None else None
        if asked is not None:  # the exchange said how long (a 429's Retry-After)
            return min(MAX_BACKOFF_S, asked)
        base = self.settings.retry_base_ms / 1000 * 2 ** (attempt - 1)
        if isinstance(exc, ccxt.DDoSProtection | ccxt.RateLimitExceeded):
            base *= RATE_LIMIT_BACKOFF_FACTOR
        return min(MAX_BACKOFF_S, base * (0.5 + self._rng.random()))

    def _resync_time(self) -> None:
        """After -1021: re-measure the offset ccxt signs requests with (if it has one)."""
        resync = getattr(self.raw, "load_time_difference", None)
        if resync is None:
            return
        try:
            self._call(resync)
            log.info("re-synchronised with the exchange clock")
        except ccxt.BaseError as exc:
            log.warning("clock re-synchronisation failed: %s", error_text(exc))

    def _resolve_ambiguous(self, sent: OrderRequest, exc: BaseException) -> SubmitResult:
        cid = sent.client_order_id
        errors = [error_text(exc)]
        log.warning("order %s: outcome unknown (%s); looking it up by client order id",
                    cid, errors[0])
        is_stop = sent.type == "stop_market"
        for attempt in range(LOOKUP_ATTEMPTS):
            if attempt:
                self._sleep(self._backoff_s(attempt, None))
            try:
                report = self._lookup(sent.symbol, cid, None, is_stop)
            except (ccxt.BaseError, BadExchangeData) as lookup_exc:
                errors.append(f"lookup: {error_text(lookup_exc)}")
                continue
            if report is not None:
                log.info("order %s: found on the exchange (%s)", cid, report.status)
                return self._from_report(sent, report, errors)
            errors.append("lookup: not found")
        log.warning("order %s: still unknown after %d lookups; reconciliation resolves it",
                    cid, LOOKUP_ATTEMPTS)
        return SubmitResult("unknown", sent, reason="ambiguous error and not found by "
                            "client order id", errors=errors)

    def _lookup(self, symbol: str, client_order_id: str | None,
                exchange_order_id: str | None, trigger: bool) -> OrderReport | None:
        params: dict[str, Any] = {"clientOrderId": client_order_id} if client_order_id else {}
        if trigger:
            params["trigger"] = True
        name = client_order_id or exchange_order_id
        try:
            raw = self._retrying(f"fetch_order {name}", self.raw.fetch_order,
                                 None if client_order_id else exchange_order_id, symbol, params)
        except ccxt.OrderNotFound:
            return None
        try:
            report = self._order_report(raw, trigger=trigger)
        except BadExchangeData as exc:
            raise self._bad(f"order {name}", str(exc), raw) from None
        return self._executed(report)

    def _executed(self, stop: OrderReport) -> OrderReport:
        """A triggered stop as the order it became: that order's status, fill and average.

        Binance's algo service answers a triggered stop with its own status (TRIGGERED:
        passed to the matching engine; FINISHED: that order is done) and the id of that
        order (``actualOrderId``), but not what filled: ccxt reads it as closed with
        nothing filled, which alone would look like a stop that expired unexecuted.
        """
        if stop.status != "triggered" or stop.triggered_order_id is None:
            return stop
        order = self._lookup(stop.symbol, None, stop.triggered_order_id, trigger=False)
        if order is None:  # not visible yet
            return stop
        return replace(stop, status="triggered" if order.status == "open" else order.status,
                       amount=order.amount, filled=order.filled,
                       average_price=order.average_price, ts=order.ts or stop.ts)

    # ---- internals: parsing and validation -----------------------------------------

    def _markets(self) -> dict:
        markets = getattr(self.raw, "markets", None)
        if not markets:
            self.load_markets()
            markets = self.raw.markets
        return markets

    def _market_dict(self, symbol: str) -> dict:
        m = self._markets().get(symbol)
        if not isinstance(m, dict):
            raise self._bad("market", f"unknown symbol {symbol!r}", symbol)
        return m

    def _step(self, value: Any) -> Decimal | None:
        step = _decimal(value, "precision", required=False, positive=True)
        if step is not None and getattr(self.raw, "precisionMode", ccxt.TICK_SIZE) \
                == ccxt.DECIMAL_PLACES:
            return Decimal(1).scaleb(-int(step))
        return step

    def _ticker(self, symbol: str, t: Any) -> Ticker:
        if not isinstance(t, dict):
            raise BadExchangeData("not a mapping")
        ts = _timestamp(t.get("timestamp"))
        return Ticker(
            symbol=symbol,
            last=_decimal(t.get("last"), "last", positive=True),
            quote_volume=_decimal(t.get("quoteVolume"), "quoteVolume", nonneg=True),
            ts=self.clock.now_ms() if ts is None else ts,  # when we saw it
            high=_decimal(t.get("high"), "high", required=False, positive=True),
            low=_decimal(t.get("low"), "low", required=False, positive=True),
        )

    def _position(self, p: Any) -> PositionReport | None:
        if not isinstance(p, dict):
            raise BadExchangeData("position is not a mapping")
        symbol = p.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise BadExchangeData("position without symbol")
        contracts = _decimal(p.get("contracts"), f"{symbol} contracts")
        if contracts == 0:
            return None
        side = p.get("side")
        if side not in ("long", "short"):
            raise BadExchangeData(f"{symbol} side {side!r}")
        size = _decimal(p.get("contractSize"), f"{symbol} contractSize", required=False,
                        positive=True) or Decimal(1)
        leverage = p.get("leverage")
        return PositionReport(
            symbol=symbol,
            side=side,
            amount=abs(contracts) if size == 1 else abs(contracts) * size,
            entry_price=_decimal(p.get("entryPrice"), f"{symbol} entryPrice", positive=True),
            mark_price=_decimal(p.get("markPrice"), f"{symbol} markPrice", required=False,
                                positive=True),
            unrealized_pnl=_decimal(p.get("unrealizedPnl"), f"{symbol} unrealizedPnl"),
            leverage=int(leverage) if isinstance(leverage, int | float) and leverage > 0 else None,
        )

    def _order_list(self, what: str, raw: Any, trigger: bool) -> list[OrderReport]:
        if not isinstance(raw, list):
            raise self._bad(what, "not a list", raw)
        out = []
        for o in raw:
            try:
                out.append(self._order_report(o, trigger=trigger))
            except BadExchangeData as exc:
                raise self._bad(what, str(exc), o) from None
        return out

    def _order_report(self, o: Any, trigger: bool) -> OrderReport:
        if not isinstance(o, dict):
            raise BadExchangeData("order is not a mapping", summarize(o))
        symbol = o.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise BadExchangeData("order without symbol", summarize(o))
        side = o.get("side")
        if side not in ("buy", "sell"):
            raise BadExchangeData(f"order side {side!r}", summarize(o))
        status = ORDER_STATUSES.get(o.get("status"))
        if status is None:
            raise BadExchangeData(f"order status {o.get('status')!r}", summarize(o))
        amount = _decimal(o.get("amount"), "order amount", nonneg=True)
        filled = _decimal(o.get("filled"), "order filled", nonneg=True)
        if filled > amount:
            raise BadExchangeData(f"order filled {filled} above amount {amount}", summarize(o))
        average = _decimal(o.get("average"), "order average", required=False, nonneg=True)
        trigger_price = _decimal(o.get("triggerPrice"), "order triggerPrice", required=False,
                                 nonneg=True)
        exchange_id = o.get("id")
        client_id = o.get("clientOrderId") or None
        if exchange_id in (None, "") and client_id is None:
            raise BadExchangeData("order without any id", summarize(o))
        is_trigger = trigger or bool(trigger_price)
        triggered = None
        if trigger:  # an answer of the algo service (the order a stop became, which may
            # carry the stop's trigger price, is read as the regular order it is)
            info = _info(o)
            actual = info.get("actualOrderId")
            triggered = str(actual) if actual not in (None, "", 0, "0") else None
            # It fired (ccxt reads TRIGGERING as open, TRIGGERED and FINISHED as closed;
            # any answer naming the order it became fired, whatever its status): what came
            # of it is the order's (_executed).
            if status == "closed" or info.get("algoStatus") in FIRED_ALGO_STATUSES \
                    or triggered is not None:
                status = "triggered"
        return OrderReport(
            symbol=symbol,
            client_order_id=str(client_id) if client_id is not None else None,
            exchange_order_id=str(exchange_id) if exchange_id not in (None, "") else None,
            side=side,
            type="stop_market" if is_trigger else str(o.get("type") or "market"),
            status=status,
            amount=amount,
            filled=filled,
            average_price=average or None,
            trigger_price=trigger_price or None,
            reduce_only=bool(o.get("reduceOnly")),
            ts=_timestamp(o.get("timestamp")),
            is_trigger=is_trigger,
            triggered_order_id=triggered,
        )

    def _fill(self, symbol: str, t: Any) -> FillReport:
        if not isinstance(t, dict):
            raise BadExchangeData("trade is not a mapping")
        trade_id = t.get("id")
        if trade_id in (None, ""):
            raise BadExchangeData("trade without id")
        side = t.get("side")
        if side not in ("buy", "sell"):
            raise BadExchangeData(f"trade side {side!r}")
        ts = _timestamp(t.get("timestamp"))
        if ts is None:
            raise BadExchangeData(f"trade timestamp {t.get('timestamp')!r}")
        fee = t.get("fee")
        if not isinstance(fee, dict):
            raise BadExchangeData("trade without fee")
        info = _info(t)
        client_id = t.get("clientOrderId") or info.get("clientOrderId")
        order_id = t.get("order")
        return FillReport(
            symbol=t.get("symbol") or symbol,
            trade_id=str(trade_id),
            exchange_order_id=str(order_id) if order_id not in (None, "") else None,
            client_order_id=str(client_id) if client_id else None,
            side=side,
            amount=_decimal(t.get("amount"), "trade amount", positive=True),
            price=_decimal(t.get("price"), "trade price", positive=True),
            fee=_decimal(fee.get("cost"), "trade fee"),
            fee_currency=str(fee.get("currency") or self.settings.quote),
            ts=ts,
            realized_pnl=_decimal(info.get("realizedPnl"), "realizedPnl", required=False),
        )

    def _from_report(self, sent: OrderRequest, report: OrderReport,
                     errors: list[str]) -> SubmitResult:
        if report.status == "rejected":
            return SubmitResult("rejected", sent, order=report,
                                reason="the exchange reports the order rejected", errors=errors)
        return SubmitResult("accepted", sent, order=report, errors=errors)

    def _rejected_locally(self, req: OrderRequest, reason: str) -> SubmitResult:
        log.warning("order %s: rejected locally, not sent: %s", req.client_order_id, reason)
        return SubmitResult("rejected", req, reason=f"not sent: {reason}")

    def _bad(self, what: str, problem: str, payload: Any) -> BadExchangeData:
        summary = summarize(payload)
        log.warning("%s: bad exchange data: %s; raw: %s", what, problem, summary)
        return BadExchangeData(f"{what}: {problem}", summary)


# ---- pure helpers ----------------------------------------------------------------------

def _info(parsed: dict) -> dict:
    """The raw exchange body ccxt keeps beside a parsed structure (empty if none)."""
    info = parsed.get("info")
    return info if isinstance(info, dict) else {}


def clean_candles(rows: Any, tf_ms: int, server_now_ms: int) -> tuple[list[Candle], dict]:
    """Closed, valid candles sorted by time, and counts of what was dropped and why.

    A candle is closed when its open time + timeframe <= the exchange's now. The one
    forming candle is normal and not counted as a problem.
    """
    problems: dict[str, int] = {}

    def drop(why: str) -> None:
        problems[why] = problems.get(why, 0) + 1

    if not isinstance(rows, list | tuple):
        drop("not a list")
        return [], problems
    if not rows:
        drop("empty")
        return [], problems
    by_ts: dict[int, Candle] = {}
    forming = 0
    last_ts = None
    for row in rows:
        candle = _candle(row, drop)
        if candle is None:
            continue
        if last_ts is not None and candle.ts < last_ts:
            drop("out of order")  # repaired by sorting
        last_ts = candle.ts
        if candle.ts % tf_ms:
            drop("misaligned")
        elif candle.ts > server_now_ms:
            drop("in the future")
        elif candle.ts + tf_ms > server_now_ms:
            forming += 1
        elif candle.ts in by_ts:
            drop("duplicate")
        else:
            by_ts[candle.ts] = candle
    if forming > 1:
        problems["forming"] = forming
    candles = [by_ts[ts] for ts in sorted(by_ts)]
    gaps = sum((b.ts - a.ts) // tf_ms - 1 for a, b in zip(candles, candles[1:], strict=False))
    if gaps:
        problems["missing"] = gaps  # not dropped: reported
    return candles, problems


def _candle(row: Any, drop: Callable[[str], None]) -> Candle | None:
    if not isinstance(row, list | tuple) or len(row) < 6:
        drop("malformed")
        return None
    ts = _timestamp(row[0])
    if ts is None:
        drop("bad timestamp")
        return None
    values = [_float(v) for v in row[1:6]]
    o, h, low, c, vol = values
    if not all(math.isfinite(x) for x in values):
        drop("NaN or missing value")
        return None
    if min(o, h, low, c) <= 0:
        drop("zero or negative price")
        return None
    if vol < 0:
        drop("negative volume")
        return None
    if h < low or h < max(o, c) or low > min(o, c):
        drop("high/low inconsistent")
        return None
    return Candle(ts=ts, open=o, high=h, low=low, close=c, volume=vol)


def _timestamp(value: Any) -> int | None:
    """A positive integer timestamp (ints of any kind, or integral floats), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    else:
        return None
    return value if value > 0 else None


def _float(value: Any) -> float:
    """A candle value as float; NaN for anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _decimal(value: Any, what: str, *, required: bool = True, positive: bool = False,
             nonneg: bool = False) -> Decimal | None:
    """An exchange number as Decimal (from its string when it has one); validated."""
    if value is None or value == "":
        if required:
            raise BadExchangeData(f"{what} missing")
        return None
    if isinstance(value, bool):
        raise BadExchangeData(f"{what} is not a number: {value!r}")
    try:
        if isinstance(value, Decimal | int | str):
            d = Decimal(value)
        else:
            d = Decimal(repr(float(value)))
    except (InvalidOperation, TypeError, ValueError):
        raise BadExchangeData(f"{what} is not a number: {_clip(repr(value), 40)}") from None
    if not d.is_finite():
        raise BadExchangeData(f"{what} is not finite: {value!r}")
    if positive and d <= 0:
        raise BadExchangeData(f"{what} must be positive, got {value!r}")
    if nonneg and d < 0:
        raise BadExchangeData(f"{what} must not be negative, got {value!r}")
    return d


def _request_problem(req: OrderRequest) -> str:
    if req.side not in ("buy", "sell"):
        return f"side {req.side!r}"
    if req.type not in ("market", "stop_market"):
        return f"order type {req.type!r}"
    if not isinstance(req.client_order_id, str) or not CLIENT_ID_RE.match(req.client_order_id):
        return (f"client order id {req.client_order_id!r}: at most 36 characters of "
                f"[.A-Z:/a-z0-9_-]")
    if req.type == "stop_market":
        if req.trigger_price is None:
            return "a stop order needs a trigger price"
        try:
            _decimal(req.trigger_price, "trigger price", positive=True)
        except BadExchangeData as exc:
            return str(exc)
        if not req.reduce_only:
            return "stop orders are reduce-only"
    elif req.trigger_price is not None:
        return "a market order takes no trigger price"
    return ""


def _tradable(markets: dict, quote: str) -> set[str]:
    """Active perpetual swaps quoted and settled in ``quote``."""
    return {s for s, m in markets.items()
            if isinstance(m, dict) and m.get("active") is not False and m.get("quote") == quote
            and m.get("settle", quote) == quote and m.get("type", "swap") == "swap"}


def _open_binance_position_rows(body: Any) -> int | None:
    """Rows with a non-zero positionAmt in a raw Binance positionRisk body (None: not one)."""
    if not isinstance(body, list):
        return None
    rows = [r for r in body if isinstance(r, dict) and "positionAmt" in r]
    if len(rows) != len(body):
        return None
    count = 0
    for r in rows:
        try:
            count += Decimal(str(r["positionAmt"])) != 0
        except (InvalidOperation, ValueError):
            count += 1  # unreadable: assume open, so the mismatch is reported
    return count


def _info_asset(info: Any, currency: str) -> dict | None:
    """Binance's per-asset account row (walletBalance, marginBalance), if present."""
    assets = info.get("assets") if isinstance(info, dict) else None
    if isinstance(assets, list):
        for a in assets:
            if isinstance(a, dict) and a.get("asset") == currency:
                return a
    return None


def summarize(payload: Any, limit: int = SUMMARY_CHARS) -> str:
    """A short, one-line description of a raw payload for the log (ccxt's info dropped)."""
    if isinstance(payload, dict) and "info" in payload:
        payload = {k: v for k, v in payload.items() if k != "info"}
    if isinstance(payload, list) and len(payload) > 4:
        text = f"[{len(payload)} items: {payload[:2]!r} ... {payload[-1]!r}]"
    else:
        text = repr(payload)
    return _clip(text, limit)


def _http_response(exc: BaseException):
    """The HTTP response behind a ccxt error (ccxt raises while handling an HTTPError)."""
    return getattr(exc.__context__, "response", None)


def is_ip_ban(exc: BaseException) -> bool:
    """Is ``exc`` the exchange's 418: this IP is banned, and calling on lengthens it?"""
    return _http_status(exc) == IP_BANNED_STATUS


def _http_status(exc: BaseException) -> int | None:
    status = getattr(_http_response(exc), "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after_s(exc: BaseException) -> float | None:
    headers = getattr(_http_response(exc), "headers", None) or {}
    try:
        value = float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None
    return value if 0 <= value < math.inf else None  # "inf", "nan": no number of seconds


def _may_have_executed(exc: BaseException) -> bool:
    """Binance: an order answered with a 5xx, notably 503 "Unknown error, please check
    your request or try again later.", has an unknown execution status, whatever code its
    body carries (ccxt maps the body's code, which may read as "not processed")."""
    status = _http_status(exc)
    return (status is not None and status >= 500) or "unknown error" in str(exc).lower()


# HMAC keys sign in hex; RSA and Ed25519 keys in (URL-encoded) base64.
_SIGNATURE = re.compile(r"signature=[^&\s\"',;]+")


def mask_signature(exc: BaseException) -> None:
    """Mask a signed request's signature in ``exc``'s message, in place (type kept), and
    drop the exceptions it was raised from: requests' and urllib3's, whose messages (shown
    in a traceback) hold the signed URL too, and say nothing ccxt's does not."""
    text = str(exc)
    masked = _SIGNATURE.sub("signature=...", text)
    if masked != text:
        exc.args = (masked,)
    exc.__cause__ = None
    exc.__suppress_context__ = True


def error_text(exc: BaseException) -> str:
    """One line about an exchange error, its request's signature masked."""
    return _clip(f"{type(exc).__name__}: {_SIGNATURE.sub('signature=...', str(exc))}")


def _clip(text: str, limit: int = SUMMARY_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _counts(problems: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in problems.items())


__all__ = ["ExchangeClient", "IpBan", "IpBanned", "build_ccxt", "clean_candles", "is_ip_ban",
           "summarize"]
