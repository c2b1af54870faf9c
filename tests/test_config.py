"""core/config.py: built-in defaults, bot.toml overrides, one clear message per bad value,
secrets only from the environment and never shown."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib

import pytest

from core import config
from core.config import Config, ConfigError, check_can_trade, from_mapping, load, to_mapping

KEY = "AKIAexampleKEY-7f3a9"
SECRET = "s3cr3t-VALUE-q8z1x"
ENV = {"BOT_API_KEY": KEY, "BOT_API_SECRET": SECRET}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so no stray ./bot.toml is picked up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def refusal(text: str, **kwargs) -> str:
    """The ConfigError message for a TOML text."""
    with pytest.raises(ConfigError) as info:
        from_mapping(tomllib.loads(text), source="bot.toml", **kwargs)
    return str(info.value)


# -- defaults ---------------------------------------------------------------------------

# The defaults the issue promises, one by one.
DEFAULTS = [
    ("exchange", "leverage", 3),
    ("risk", "trade_fraction", 0.80),
    ("rotation", "top_n", 8),
    ("strategy", "min_body_pct", 0.7),
    ("strategy", "long_volume_ratio", 1.8),
    ("strategy", "short_volume_ratio", 1.5),
    ("strategy", "choppiness_max", 50.0),
    ("exits", "stop_loss_pct", 2.0),
    ("exits", "trailing_activation_pct", 2.0),
    ("exits", "trailing_stop_pct", 0.5),
    ("exits", "surge_pct", 4.0),
    ("schedule", "scan_interval_s", 10),
    ("schedule", "rotate_interval_h", 3.0),
    ("risk", "daily_loss_limit_pct", 5.0),
    ("risk", "max_drawdown_pct", 15.0),
]


@pytest.mark.parametrize(("section", "key", "expected"), DEFAULTS,
                         ids=[f"{s}.{k}" for s, k, _ in DEFAULTS])
def test_builtin_default(in_tmp, section, key, expected):
    cfg = load(environ={})
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_defaults_without_a_file(in_tmp):
    cfg = load(environ={})
    assert cfg == Config()
    assert cfg.source == "(built-in defaults)"
    assert cfg.bot.mode == "sim"
    assert cfg.risk.max_open_positions == 8
    assert cfg.rotation.blacklist == ()


def test_every_parameter_is_documented_with_a_valid_default():
    rows = config.describe()
    assert len(rows) == sum(len(dataclasses.fields(c)) for c in config.SECTIONS.values())
    for section, key, _default, doc in rows:
        assert doc.strip(), f"[{section}] {key} has no doc"
    # The defaults pass their own validation.
    assert from_mapping(to_mapping(Config())) == Config()


# -- the file ---------------------------------------------------------------------------


def test_file_overrides_only_what_it_names(tmp_path):
    path = write_toml(tmp_path / "my.toml", """
        [exchange]
        leverage = 5
        [risk]
        trade_fraction = 0.5
        max_open_positions = 3
        [rotation]
        blacklist = ["LUNA/USDT:USDT", "1000PEPE/USDT:USDT", "币安人生/USDT:USDT"]
    """)
    cfg = load(path, environ={})
    assert cfg.exchange.leverage == 5
    assert cfg.risk.trade_fraction == 0.5
    assert cfg.risk.max_open_positions == 3
    # Binance lists bases that start with digits, and in other scripts
    assert cfg.rotation.blacklist == ("LUNA/USDT:USDT", "1000PEPE/USDT:USDT", "币安人生/USDT:USDT")
    assert cfg.source == str(path)
    # Everything else keeps its default.
    assert cfg.exits == Config().exits
    assert cfg.risk.max_drawdown_pct == 15.0
    assert cfg.exchange.margin_mode == "cross"


def test_bot_toml_in_the_working_folder_is_picked_up(in_tmp):
    write_toml(in_tmp / "bot.toml", "[schedule]\nscan_interval_s = 30\n")
    cfg = load(environ={})
    assert cfg.schedule.scan_interval_s == 30
    assert cfg.source == "bot.toml"


def test_integer_for_a_float_parameter_becomes_a_float(tmp_path):
    cfg = load(write_toml(tmp_path / "b.toml", "[risk]\ntrade_fraction = 1\n"), environ={})
    assert cfg.risk.trade_fraction == 1.0
    assert type(cfg.risk.trade_fraction) is float


def test_the_effective_config_round_trips(tmp_path):
    cfg = load(write_toml(tmp_path / "b.toml", "[strategy]\nsma_fast = 10\nsma_slow = 30\n"),
               environ={})
    assert from_mapping(to_mapping(cfg)) == cfg


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: p / "absent.toml", "config file not found"),
    (lambda p: p, "is a directory"),
    (lambda p: write_toml(p / "bad.toml", "[risk\nx = 1"), "not valid TOML"),
    (lambda p: write_toml(p / "dup.toml", "[risk]\nrisk_pct = 1\nrisk_pct = 2\n"),
     "not valid TOML"),
], ids=["missing", "directory", "syntax", "duplicate-key"])
def test_unreadable_file_is_refused_naming_it(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b"[bot]\nid = \"caf\xe9\"\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(path, environ={})


# -- one clear message per bad value ----------------------------------------------------

BAD = [
    # (toml, the key as named, what was given, what is allowed)
    ("[risk]\nmax_open_position = 3", "[risk] max_open_position", "unknown key",
     "max_open_positions"),
    ("[riskk]\nmax_open_positions = 3", "[riskk]", "unknown section", "risk"),
    ("risk = 3", "[risk]", "must be a table", "integer"),
    ("[exchange]\nleverage = \"3\"", "[exchange] leverage", "'3'", "an integer"),
    ("[exchange]\nleverage = 3.0", "[exchange] leverage", "3.0", "an integer"),
    ("[exchange]\nleverage = true", "[exchange] leverage", "True", "an integer"),
    ("[exchange]\nleverage = 0", "[exchange] leverage", "= 0", "1 <= value <= 125"),
    ("[exchange]\nleverage = 126", "[exchange] leverage", "= 126", "1 <= value <= 125"),
    ("[exchange]\ndemo = \"yes\"", "[exchange] demo", "'yes'", "true or false"),
    ("[exchange]\nmargin_mode = \"portfolio\"", "[exchange] margin_mode", "'portfolio'",
     "cross | isolated"),
    # another venue's orders, error codes and contract sizes are not what the client speaks
    ("[exchange]\nid = \"okx\"", "[exchange] id", "'okx'", "binanceusdm"),
    ("[risk]\ntrade_fraction = 1.2", "[risk] trade_fraction", "1.2", "0 < value <= 1"),
    ("[risk]\ntrade_fraction = 0", "[risk] trade_fraction", "= 0", "0 < value <= 1"),
    ("[risk]\ntrade_fraction = true", "[risk] trade_fraction", "True", "a number"),
    ("[exits]\nstop_loss_pct = -1", "[exits] stop_loss_pct", "-1", "0 < value <= 100"),
    ("[exits]\nstop_loss_pct = nan", "[exits] stop_loss_pct", "nan", "0 < value <= 100"),
    ("[risk]\nmax_position_notional = inf", "[risk] max_position_notional", "inf",
     "value >= 0"),
    ("[schedule]\nscan_interval_s = 0", "[schedule] scan_interval_s", "= 0",
     "1 <= value <= 86400"),
    ("[schedule]\nscan_interval_s = 2.5", "[schedule] scan_interval_s", "2.5", "an integer"),
    ("[bot]\nid = \"bot-1\"", "[bot] id", "'bot-1'", "[A-Za-z0-9]{1,8}"),
    ("[bot]\nid = \"bot1\\n\"", "[bot] id", "'bot1\\n'", "a whole string matching"),
    ("[exchange]\nquote = \"\"", "[exchange] quote", "''", "[A-Z0-9]{2,10}"),
    ("[sim]\nstate_path = \" \"", "[sim] state_path", "' '", "a whole string matching"),
    ("[sim]\nseed = -5", "[sim] seed", "-5", "0 <= value <= 4294967295"),
    ("[sim]\nstart_balance = 1e308", "[sim] start_balance", "1e+308",
     "0 < value <= 1000000000000.0"),
    ("[bot]\nmode = \"real\"", "[bot] mode", "'real'", "sim | paper | live | backtest"),
    ("[rotation]\nblacklist = \"BTC\"", "[rotation] blacklist", "'BTC'", "a list of strings"),
    # another spelling than the exchange's unified symbol would silently exclude nothing
    ("[rotation]\nblacklist = [\"LUNA/USDT:USDT\", \"LUNAUSDT\"]", "[rotation] blacklist",
     "'LUNAUSDT' not allowed", "items each a whole string matching"),
    ("[rotation]\nblacklist = [\"luna/usdt:usdt\"]", "[rotation] blacklist",
     "'luna/usdt:usdt' not allowed", "items each"),
    ("[rotation]\nblacklist = [\"LUNA/USDT\"]", "[rotation] blacklist", "'LUNA/USDT'",
     "items each"),
    ("[rotation]\nblacklist = [1, 2]", "[rotation] blacklist", "[1, 2]", "a list of strings"),
    ("[strategy]\ntimeframe = \"7m\"", "[strategy] timeframe", "'7m'", "1m | 3m | 5m"),
    ("[strategy]\nsma_fast = 50\nsma_slow = 40", "[strategy] sma_fast", "50",
     "below sma_slow (40)"),
]


@pytest.mark.parametrize(("text", "key", "given", "allowed"), BAD,
                         ids=[b[0].replace("\n", " ") for b in BAD])
def test_bad_value_names_key_given_and_allowed(text, key, given, allowed):
    message = refusal(text)
    assert message.startswith("bot.toml: invalid config")
    assert key in message
    assert given in message
    assert allowed in message
    assert "Traceback" not in message


def test_every_problem_is_reported_at_once():
    message = refusal("[exchange]\nleverage = 0\n[risk]\ntrade_fraction = 2\nbogus = 1\n")
    lines = message.splitlines()[1:]
    assert len(lines) == 3
    assert any("[exchange] leverage = 0" in line for line in lines)
    assert any("[risk] trade_fraction = 2" in line for line in lines)
    assert any("[risk] bogus: unknown key" in line for line in lines)


def _bounds():
    """(section, key, value just outside the range) for every bounded parameter."""
    out = []
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            meta = f.metadata
            step = 1 if f.type == "int" else 0.001
            if meta["lo"] is not None:
                out.append((section, f.name, meta["lo"] if meta["lo_open"] else meta["lo"] - step))
            if meta["hi"] is not None:
                out.append((section, f.name, meta["hi"] + step))
    return out


@pytest.mark.parametrize(("section", "key", "value"), _bounds())
def test_every_range_is_enforced(section, key, value):
    with pytest.raises(ConfigError) as info:
        from_mapping({section: {key: value}})
    assert f"[{section}] {key} = {value!r}: out of range; allowed:" in str(info.value)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("risk", "trade_fraction", 1.0),  # the closed upper bound
    ("exits", "trailing_stop_pct", 0.001),  # just above an open lower bound
    ("exchange", "leverage", 125),
    ("exchange", "leverage", 1),
    ("risk", "correlation_max", -1.0),
])
def test_range_edges_are_accepted(section, key, value):
    cfg = from_mapping({section: {key: value}})
    assert getattr(getattr(cfg, section), key) == value


def test_live_mode_needs_keys_in_the_environment_to_trade_not_to_read(tmp_path):
    # An operator's shell on a live server has no keys (the service's unit file loads
    # them): status and config show still read the config; run, job and reconcile refuse.
    path = write_toml(tmp_path / "live.toml", "[bot]\nmode = \"live\"\n")
    keyless = load(path, environ={})
    assert keyless.bot.mode == "live"
    with pytest.raises(ConfigError, match="BOT_API_KEY and BOT_API_SECRET"):
        check_can_trade(keyless)
    check_can_trade(load(path, environ=ENV))


@pytest.mark.parametrize(("text", "where"), [
    ("[sim]\nstate_path = \"{tmp}/missing/x.db\"", "[sim] state_path"),
    ("[sim]\nstate_path = \"{tmp}\"", "[sim] state_path"),
    ("[bot]\nlog_dir = \"{tmp}/file/logs\"", "[bot] log_dir"),
])
def test_a_file_the_service_would_write_where_it_cannot_is_refused_by_key(tmp_path, text,
                                                                          where):
    (tmp_path / "file").write_text("not a folder")
    cfg = load(write_toml(tmp_path / "bot.toml", text.format(tmp=tmp_path)), environ={})
    with pytest.raises(ConfigError, match=re.escape(where)) as refused:
        check_can_trade(cfg, serving=True)
    assert "Traceback" not in str(refused.value)
    if where == "[bot] log_dir":  # only the service writes log files
        check_can_trade(cfg)
    fine = f"[sim]\nstate_path = \"{tmp_path}/x.db\"\n[bot]\nlog_dir = \"{tmp_path}/a/b\""
    check_can_trade(load(write_toml(tmp_path / "ok.toml", fine), environ={}))


@pytest.mark.parametrize(("text", "message"), [
    # a float key given an integer no float holds: a traceback (OverflowError) before
    ("[risk]\nmax_position_notional = 1" + "0" * 400, "not a finite number"),
    # slower than this overflowed the scheduler's timers after files were made
    ("[sim]\nspeed = 1e-13", "0.001 <= value <= 100000"),
])
def test_numbers_nothing_could_run_on_are_refused(text, message):
    assert message in refusal(text)


@pytest.mark.parametrize(("text", "message"), [
    ('[strategy]\nname = "nope"', "[strategy] name = 'nope': unknown strategy"),
    ('[sim]\nsource = "csv"', "[sim] source = 'csv' needs [sim] data_dir"),
    ('[sim]\nsource = "csv"\ndata_dir = "{tmp}/none"', "no such folder of CSV candles"),
    # a folder of another timeframe's candles (only 5 m ones, and a 1 h strategy)
    ('[sim]\nsource = "csv"\ndata_dir = "{tmp}/candles"\n[strategy]\ntimeframe = "1h"',
     "no BASE_QUOTE-1h.csv files for [strategy] timeframe = '1h'"),
    ('[sim]\nsource = "live"', "[bot] mode = 'paper'"),
    # paper mode would ignore it and trade on the live market
    ('[bot]\nmode = "paper"\n[sim]\nsource = "csv"\ndata_dir = "{tmp}"',
     "paper mode trades on the exchange's live market"),
    # test-only: they SIGKILL the bot; a paper account's state would be left half-done
    ('[bot]\nmode = "paper"\n[faults]\ncrash_after_accept = 0.5',
     "[faults] crash_after_accept: TEST ONLY faults that SIGKILL the process; paper mode"),
    ('[bot]\nlog_dir = "{tmp}/dangling"', "symbolic link to nothing"),
    ('[bot]\nmode = "backtest"', "[bot] mode = 'backtest' is not served by `run`"),
    # paper mode's own state file, beside [sim] state_path, is a folder
    ('[bot]\nmode = "paper"\n[sim]\nstate_path = "{tmp}/x.db"', "paper mode's state file"),
    ('[bot]\nmode = "paper"\n[sim]\nstate_path = "."', "is a folder, not a file"),
])
def test_what_run_would_fail_on_is_refused_before_anything_is_made(tmp_path, text,
                                                                   message):
    """These were refused (or crashed) only after the ledger, the lock, the logs and the
    simulated exchange's file had been made."""
    (tmp_path / "dangling").symlink_to(tmp_path / "not_yet" / "logs")
    (tmp_path / "paper_x.db").mkdir()
    (tmp_path / "candles").mkdir()
    (tmp_path / "candles" / "ETH_BTC-5m.csv").write_text("timestamp,open,high,low,close,volume\n")
    cfg = load(write_toml(tmp_path / "bot.toml", text.format(tmp=tmp_path)), environ={})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_can_trade(cfg, serving=True)


def test_an_array_of_tables_is_not_echoed_in_a_refusal():
    message = refusal("[rotation]\nblacklist = [{api_key = \"AKIASENTINEL\"}]")
    assert "[rotation] blacklist = [...]" in message and "AKIASENTINEL" not in message


# -- with_values ------------------------------------------------------------------------


def test_with_values_is_a_validated_copy():
    base = Config()
    cfg = base.with_values(risk={"max_open_positions": 3}, exits={"stop_loss_pct": 1.5})
    assert cfg.risk.max_open_positions == 3
    assert cfg.exits.stop_loss_pct == 1.5
    assert cfg.risk.trade_fraction == base.risk.trade_fraction
    assert base.risk.max_open_positions == 8  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.risk.max_open_positions = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"\[risk\] max_open_positions = 0: out of range"):
        base.with_values(risk={"max_open_positions": 0})


def test_with_values_refuses_an_unknown_section_as_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown section \[riskk\]"):
        Config().with_values(riskk={"max_open_positions": 3})


def test_with_values_accepts_a_tuple_for_a_list_parameter():
    cfg = Config().with_values(rotation={"blacklist": ("LUNA/USDT:USDT",)})
    assert cfg.rotation.blacklist == ("LUNA/USDT:USDT",)


def test_with_values_keeps_the_secrets():
    cfg = Config(secrets=config.load_secrets(ENV))
    assert cfg.with_values(risk={"risk_pct": 2.0}).secrets.api_key == KEY


# -- secrets ----------------------------------------------------------------------------


def test_secrets_come_from_the_environment_only(in_tmp):
    cfg = load(environ=ENV)
    assert cfg.secrets.api_key == KEY
    assert cfg.secrets.api_secret == SECRET
    assert cfg.secrets.has_keys
    assert not load(environ={}).secrets.has_keys
    assert not load(environ={"BOT_API_KEY": KEY}).secrets.has_keys


@pytest.mark.parametrize("text", [
    f'[exchange]\napi_key = "{KEY}"\n',
    f'[exchange]\napiSecret = "{SECRET}"\n',
    f'api_key = "{KEY}"\n',  # top level, the most natural place to put it
    f'[binance]\napi_secret = "{SECRET}"\n',  # a table of our own invention
    f'[exchange.credentials]\nkey = "{KEY}"\n',
    f'[sim]\npassword = "{SECRET}"\n',
], ids=["section", "camel", "top-level", "unknown-table", "sub-table", "password"])
def test_secret_in_the_file_is_refused_pointing_to_env(text):
    message = refusal(text)
    assert "secrets are never read from the config file" in message
    assert "BOT_API_KEY" in message and "BOT_API_SECRET" in message
    assert KEY not in message and SECRET not in message


def test_an_unknown_key_that_only_sounds_like_a_secret_is_still_named_unknown():
    """``sort_key`` was answered with the secrets advice alone, hiding the known keys."""
    message = refusal('[strategy]\nsort_key = 3\n')
    assert "[strategy] sort_key: unknown key" in message
    assert "known keys in [strategy]: name" in message
    assert "if it is a credential: secrets are never read from the config file" in message
    assert "known sections: bot" in refusal('[tokens]\nx = 1\n')


def test_a_table_given_for_a_value_is_not_echoed():
    message = refusal(f'[exchange]\nid = {{ apikey = "{KEY}" }}\n')
    assert "[exchange] id" in message and "wrong type (table)" in message
    assert KEY not in message


def test_secrets_are_masked_everywhere_they_could_be_shown(in_tmp):
    cfg = load(environ=ENV)
    for text in (repr(cfg), str(cfg), repr(cfg.secrets), str(cfg.secrets),
                 str(to_mapping(cfg)), str(config.describe())):
        assert KEY not in text and SECRET not in text
    assert "(set, hidden)" in repr(cfg.secrets)
    assert "secrets" not in to_mapping(cfg)
    assert config.mask("") == "(not set)"


def test_secrets_do_not_change_equality():
    assert Config(secrets=config.load_secrets(ENV)) == Config()


def test_range_text_reads_naturally():
    assert config._range_text(0, 1, True) == "0 < value <= 1"
    assert config._range_text(0, None, False) == "value >= 0"
    assert config._range_text(None, 5, False) == "value <= 5"
    assert config._range_text(None, None, False) == "any finite number"
    assert math.isfinite(Config().risk.max_drawdown_pct)
