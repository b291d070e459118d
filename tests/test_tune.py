"""``ksmlab tune``: the grid and its errors, the Pareto front, the recommendation rule,
ksmtuned's arithmetic, the controller hook, and a small sweep on a LocalCluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ksmlab.cli import main
from ksmlab.notebook import load_scenario
from ksmlab.scenario.backends import SimBackend
from ksmlab.scenario.control import ControlAction, ControlView
from ksmlab.scenario.loader import truncate
from ksmlab.scenario.runner import run_scenario
from ksmlab.tune.grid import MAX_POINTS, GridError, parse_grid, references
from ksmlab.tune.ksmtuned import KsmtunedConfig, KsmtunedController, KsmtunedPolicy
from ksmlab.tune.pareto import Point, pareto_front, recommend
from ksmlab.tune.result import scan_rate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BOOT = {"advisor_max_cpu": "70", "advisor_min_pages_to_scan": "500",
        "advisor_max_pages_to_scan": "30000", "advisor_target_scan_time": "200",
        "advisor_mode": "none", "pages_to_scan": "100", "sleep_millisecs": "20",
        "smart_scan": "1", "use_zero_pages": "0", "stable_node_chains_prune_millisecs": "2000",
        "merge_across_nodes": "1", "max_page_sharing": "256", "run": "0"}
"""The kernel's boot values (tests/sysfs_cases.py records them from the real kernel)."""


# --- the grid ----------------------------------------------------------------------------------

def test_grid_is_the_product_in_the_order_given() -> None:
    g = parse_grid(["pages_to_scan=100,1000", "sleep_millisecs=10,20,200", "smart_scan=false,1"])
    assert g.names == ("pages_to_scan", "sleep_millisecs", "smart_scan")
    assert g.size == 12
    configs = g.configs()
    assert len(configs) == 12
    assert configs[0].knobs == (("pages_to_scan", "100"), ("sleep_millisecs", "10"),
                                ("smart_scan", "0"))
    assert configs[-1].knobs == (("pages_to_scan", "1000"), ("sleep_millisecs", "200"),
                                 ("smart_scan", "1"))
    assert configs[1].label == "pages_to_scan=100 sleep_millisecs=10 smart_scan=1"


def test_advisor_points_drop_pages_to_scan_and_run_once() -> None:
    # 3 pages_to_scan x 2 modes = 6 points; under scan-time the 3 coincide: 4 runs.
    configs = parse_grid(["pages_to_scan=100,1000,5000", "advisor_mode=none,scan-time"]).configs()
    assert [c.label for c in configs] == [
        "pages_to_scan=100 advisor_mode=none", "advisor_mode=scan-time",
        "pages_to_scan=1000 advisor_mode=none", "pages_to_scan=5000 advisor_mode=none"]


def test_a_million_points_are_counted_not_expanded() -> None:
    specs = [f"{name}={','.join(str(v) for v in range(lo, lo + 10))}" for name, lo in (
        ("pages_to_scan", 1), ("sleep_millisecs", 1), ("max_page_sharing", 2),
        ("stable_node_chains_prune_millisecs", 1), ("advisor_max_cpu", 1),
        ("advisor_target_scan_time", 1))]
    with pytest.raises(GridError, match=r"1,000,000 configurations \(10 x 10 x 10 x 10 x 10 x 10\)"
                                        r" is more than 10,000; add --yes"):
        parse_grid(specs)
    assert parse_grid(specs, allow_large=True).size == 10 ** 6
    assert MAX_POINTS == 10_000


def test_references_share_the_knobs_at_boot_values() -> None:
    g = parse_grid(["pages_to_scan=1000", "smart_scan=0,1"])
    kernel, advisor, tuned = references(g, BOOT)
    assert kernel.reference == "kernel-defaults" and tuned.reference == "ksmtuned"
    assert dict(kernel.knobs) == {"pages_to_scan": "100", "sleep_millisecs": "20",
                                  "smart_scan": "1", "advisor_mode": "none"}
    assert dict(tuned.knobs) == dict(kernel.knobs)
    assert dict(advisor.knobs) == {"sleep_millisecs": "20", "smart_scan": "1",
                                   "advisor_mode": "scan-time", "advisor_max_cpu": "70",
                                   "advisor_min_pages_to_scan": "500",
                                   "advisor_max_pages_to_scan": "30000",
                                   "advisor_target_scan_time": "200"}


MILLION = ["--grid", "pages_to_scan=" + ",".join(str(v) for v in range(1, 101)),
           "--grid", "sleep_millisecs=" + ",".join(str(v) for v in range(1, 101)),
           "--grid", "max_page_sharing=" + ",".join(str(v) for v in range(2, 102))]


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--grid: expected at least one --grid NAME=V1,V2,..."),
    (["--grid", "pages_to_scan"], "--grid 'pages_to_scan': expected NAME=V1,V2,..."),
    (["--grid", "=1,2"], "--grid '=1,2': expected NAME=V1,V2,..."),
    (["--grid", "pages_to_scna=1,2"], "--grid pages_to_scna: unknown knob; expected one of "
                                      "pages_to_scan, sleep_millisecs,"),
    (["--grid", "run=0,1"], "--grid run: the sweep is of ksmd running"),
    (["--grid", "pages_to_scan="], "--grid pages_to_scan=: no values"),
    (["--grid", "pages_to_scan=100,,200"], "--grid pages_to_scan=100,,200: an empty value"),
    (["--grid", "pages_to_scan=100", "--grid", "pages_to_scan=200"],
     "--grid pages_to_scan: given twice"),
    (["--grid", "pages_to_scan=100,100"], "--grid pages_to_scan: value '100' given twice"),
    (["--grid", "pages_to_scan=-1"], "--grid pages_to_scan: value '-1': expected an integer "
                                     "from 0 to 4294967295"),
    (["--grid", "pages_to_scan=4294967296"], "value '4294967296': expected an integer from 0"),
    (["--grid", "max_page_sharing=1"], "--grid max_page_sharing: value '1': expected an "
                                       "integer from 2 to"),
    (["--grid", "pages_to_scan=lots"], "--grid pages_to_scan: value 'lots': expected an integer"),
    (["--grid", "smart_scan=yes"], "--grid smart_scan: value 'yes': expected true or false"),
    (["--grid", "smart_scan=2"], "--grid smart_scan: value '2': expected true or false"),
    (["--grid", "advisor_mode=fast"], "--grid advisor_mode: value 'fast': expected \"none\" or "
                                      "\"scan-time\""),
    (MILLION, "--grid: 1,000,000 configurations (100 x 100 x 100) is more than 10,000; "
              "add --yes to run them all"),
])
def test_a_bad_grid_is_one_line_exit_2_and_nothing_runs(
        argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import ksmlab.tune.sweep as sweep

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a sweep started")

    monkeypatch.setattr(sweep, "run_sweep", never)
    monkeypatch.setattr(sweep, "_client", never)
    plot, html = tmp_path / "t.png", tmp_path / "t.html"
    code = main(["tune", str(EXAMPLES / "identical-pages.toml"), *argv, "--plot", str(plot),
                 "--html", str(html)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("ksmlab tune: ")
    assert message in err
    assert not plot.exists() and not html.exists()


def test_a_configuration_the_scenario_refuses_is_found_before_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import ksmlab.tune.sweep as sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("a sweep started"))
    sc = tmp_path / "advisor.toml"
    sc.write_text((EXAMPLES / "identical-pages.toml").read_text().replace(
        "[ksm]", '[ksm]\nadvisor_mode = "scan-time"', 1))
    # The scenario runs the advisor; a grid point writing pages_to_scan alone is refused.
    text = sc.read_text()
    sc.write_text("\n".join(line for line in text.splitlines()
                            if not line.startswith("pages_to_scan")))
    code = main(["tune", str(sc), "--grid", "pages_to_scan=200"])
    err = capsys.readouterr().err
    assert code == 2
    assert "configuration pages_to_scan=200: --knob: pages_to_scan: expected no pages_to_scan " \
           "with advisor_mode = \"scan-time\"" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--cpu-budget", "0%"], "--cpu-budget: expected a share of one CPU > 0 such as 5%"),
    (["--cpu-budget", "lots"], "--cpu-budget: expected a share of one CPU > 0"),
    (["--workers", "0"], "--workers: expected a number of workers from 1 to 1024"),
    (["--scheduler", "tcp://127.0.0.1:1", "--backend", "linux"], "--scheduler: the real kernel"),
    (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers applies to the "
                                                            "LocalCluster"),
    (["--plot", "t.gif"], "--plot: expected a file name ending in .png, .svg or .pdf"),
    (["--backend", "linux", "--cost", "c.json"], "ksmlab tune: --cost applies to the model "
                                                  "(--backend sim or bulk): the real kernel has "
                                                  "its own ksmd"),
    (["--seed", "-1"], "--seed: expected an integer from 0 to 9223372036854775807, got '-1'"),
    (["--seed", "2**9"], "--seed: expected an integer from 0 to 9223372036854775807"),
])
def test_bad_options_are_refused_before_running(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tune", str(EXAMPLES / "identical-pages.toml"),
                 "--grid", "pages_to_scan=100", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


# --- the Pareto front and the recommendation ----------------------------------------------------

def test_pareto_front_by_hand() -> None:
    pts = [Point(0, 1.0, 100), Point(1, 2.0, 90),   # 1: dominated by 0 (more CPU, less saved)
           Point(2, 2.0, 150), Point(3, 5.0, 150),  # 3: same saving as 2 for more CPU
           Point(4, 8.0, 200), Point(5, 0.5, 10),
           Point(6, 8.0, 200),                       # the same point as 4: both stay
           Point(7, 9.0, 199)]
    assert pareto_front(pts) == [5, 0, 2, 4, 6]
    assert pareto_front([]) == []
    assert pareto_front([Point(3, 4.0, -5)]) == [3]


def test_recommendation_rule_by_hand() -> None:
    pts = [Point(0, 1.0, 100), Point(1, 4.0, 300), Point(2, 6.0, 500), Point(3, 3.0, 300)]
    r = recommend(pts, 5.0)
    assert r.index == 3  # 1 and 3 save 300 within 5%: the lower CPU wins
    assert "within the budget of 5% of one CPU (3 of 4 configurations fit)" in r.reason
    assert recommend(pts, None).index == 2
    assert recommend(pts, 6.0).index == 2  # the budget is inclusive
    assert recommend([Point(0, 1.0, 7), Point(1, 1.0, 7)], None).index == 0  # then the earlier
    none = recommend(pts, 0.5)
    assert none.index is None
    assert "no configuration kept ksmd within 0.5% of one CPU; the cheapest, configuration 0, " \
           "used 1%" in none.reason
    # The recommendation is always on the front.
    for budget in (None, 1.0, 3.5, 4.0, 5.0, 6.0):
        r = recommend(pts, budget)
        assert r.index in pareto_front(pts)


def test_recommendation_treats_near_ties_as_ties() -> None:
    """Savings within 5 % are one saving, CPU shares within 10 % one cost; then the lowest
    scan rate wins (the situation of docs/tune.md's proof: savings 1 to 3 % apart)."""
    # 57.7 MiB at 1.48 % (100 pages / 20 ms = 5000 pages/s) against 56.6 MiB at 0.82 %
    # (500 / 200 ms = 2500 pages/s): 56.6 >= 57.7 * 0.95, so the savings tie, and the
    # cheaper one (0.82 %) wins; 58.2 MiB would tie too.
    mib = 1 << 20
    pts = [Point(0, 1.48, int(57.7 * mib), 5000.0), Point(1, 0.82, int(56.6 * mib), 2500.0)]
    assert recommend(pts, 5.0).index == 1
    # A saving 6 % below the best is not a tie: 100 against 94 saves more.
    assert recommend([Point(0, 2.0, 100, 1.0), Point(1, 1.0, 94, 1.0)], None).index == 0
    # CPU shares 0.344 and 0.333 (3 % apart) tie; 2000 pages/s beats 2500 pages/s.
    pts = [Point(0, 0.333, 1000, 2500.0), Point(1, 0.344, 1000, 2000.0)]
    assert recommend(pts, 5.0).index == 1
    # 0.40 is more than 10 % above 0.333: the cheaper one wins whatever its rate.
    assert recommend([Point(0, 0.333, 1000, 2500.0), Point(1, 0.40, 1000, 2000.0)],
                     5.0).index == 0
    # The close call is reported: the tied one beside the choice; none beside a clear one.
    assert recommend(pts, 5.0).equivalent == (0,)
    assert recommend([Point(0, 0.333, 1000, 2500.0), Point(1, 0.40, 1000, 2000.0)],
                     5.0).equivalent == ()
    # Negative savings (metadata over savings): the tolerance is 5 % of the magnitude.
    assert recommend([Point(0, 1.0, -100, 1.0), Point(1, 1.0, -104, 0.5)], None).index == 1
    assert recommend([Point(0, 1.0, -100, 1.0), Point(1, 1.0, -106, 0.5)], None).index == 0


def test_equivalent_configurations_in_the_rule_s_order() -> None:
    """Every configuration the rule counted as equal, after the choice, by scan rate then CPU;
    a saving outside 5 % or a CPU share outside 10 % of the least is not among them."""
    pts = [Point(0, 1.00, 1000, 4000.0), Point(1, 1.05, 990, 1000.0), Point(2, 1.09, 1000, 2000.0),
           Point(3, 1.20, 1000, 500.0), Point(4, 0.90, 900, 100.0), Point(5, 1.02, 960, 1000.0)]
    # Savings >= 950: 0, 1, 2, 3, 5; least CPU 1.00, so CPU <= 1.10: 0, 1, 2, 5. By rate
    # (then CPU): 5 (1000, 1.02), 1 (1000, 1.05), 2 (2000), 0 (4000).
    r = recommend(pts, None)
    assert (r.index, r.equivalent) == (5, (1, 2, 0))
    assert recommend(pts, 0.95).equivalent == ()  # only 4 fits the budget


def test_scan_rate_of_knobs() -> None:
    assert scan_rate({"pages_to_scan": "500", "sleep_millisecs": "200"}) == 2500
    assert scan_rate({}) == 100 * 1000 / 20  # the boot values
    assert scan_rate({"sleep_millisecs": "0"}) == math.inf
    assert scan_rate({"advisor_mode": "scan-time"}) == math.inf


# --- ksmtuned's arithmetic ------------------------------------------------------------------------

def test_ksmtuned_thresholds_and_sleep_by_hand() -> None:
    # 96 MiB = 98304 KiB: thres = 98304 * 20 / 100 = 19660 (integer division);
    # sleep = 10 * 16777216 / 98304 = 1706 ms.
    p = KsmtunedPolicy(98304)
    assert (p.thres_kb, p.sleep_ms) == (19660, 1706)
    # 8 MiB: 20% is 1638 KiB, under KSM_THRES_CONST = 2048; sleep 10 * 2048 = 20480 ms.
    assert (KsmtunedPolicy(8192).thres_kb, KsmtunedPolicy(8192).sleep_ms) == (2048, 20480)
    # 16 GiB sleeps KSM_SLEEP_MSEC; 64 GiB would sleep 2 ms, and 10 is the floor.
    assert KsmtunedPolicy(16 * 1024 * 1024).sleep_ms == 10
    assert KsmtunedPolicy(64 * 1024 * 1024).sleep_ms == 10
    assert KsmtunedPolicy(64 * 1024 * 1024).thres_kb == 13421772
    with pytest.raises(ValueError, match="total_kb must be a number of KiB > 0, got 0"):
        KsmtunedPolicy(0)


def test_ksmtuned_boost_decay_and_stop_by_hand() -> None:
    p = KsmtunedPolicy(98304)  # thres 19660
    # Committed to the full (98304 + 19660 >= 98304), free below thres: boost by 300
    # from 0, up to KSM_NPAGES_MAX = 1250.
    seq = [p.adjust(free_kb=1000, committed_kb=98304) for _ in range(5)]
    assert [(a.action, a.npages, a.sleep_ms) for a in seq] == [
        ("start", 300, 1706), ("start", 600, 1706), ("start", 900, 1706), ("start", 1200, 1706),
        ("start", 1250, 1706)]
    # free >= thres: decay by 50 (free == thres decays: the boost needs free < thres).
    assert p.adjust(free_kb=19660, committed_kb=98304).npages == 1200
    assert p.adjust(free_kb=50000, committed_kb=98304).npages == 1150
    # Committed + thres < total and free > thres: stop, npages kept for the next start.
    stop = p.adjust(free_kb=19661, committed_kb=78643)
    assert stop.action == "stop" and p.npages == 1150
    # At the edge (committed + thres == total) it runs.
    assert p.adjust(free_kb=19661, committed_kb=78644).action == "start"
    # A decay from the start lands on KSM_NPAGES_MIN = 64.
    q = KsmtunedPolicy(98304)
    assert q.adjust(free_kb=50000, committed_kb=98304).npages == 64
    assert q.adjust(free_kb=50000, committed_kb=98304).npages == 64
    # Its settings are ksmtuned.conf's.
    c = KsmtunedConfig()
    assert (c.monitor_interval_s, c.sleep_msec, c.npages_boost, c.npages_decay, c.npages_min,
            c.npages_max, c.thres_coef, c.thres_const) == (60, 10, 300, -50, 64, 1250, 20, 2048)


def test_ksmtuned_controller_sees_the_hosts_memory() -> None:
    ctl = KsmtunedController(96 << 20)
    # 24576 pages resident, 1000 of them on the zero page, 5000 sharing: committed is
    # 23576 pages = 94304 KiB, used 18576 pages = 74304 KiB, free 98304 - 74304 = 24000.
    view = ControlView(60_000_000_000, {"ksm_zero_pages": 1000, "pages_sharing": 5000},
                       {}, 24576)
    assert ctl.memory_kb(view) == (24000, 94304)
    action = ctl.act(view)
    # 24000 >= thres 19660: decay from 0 to the floor, 64.
    assert action.writes == (("pages_to_scan", "64"), ("sleep_millisecs", "1706"), ("run", "1"))
    assert action.next_ns == 120_000_000_000
    assert ctl.log[0][0] == 60.0


# --- the controller hook ------------------------------------------------------------------------

class _Recorder:
    """A controller that stops ksmd at 1 s and records what it saw."""

    name = "recorder"

    def __init__(self) -> None:
        self.views: list[ControlView] = []

    def first_ns(self) -> int:
        return 500_000_000

    def act(self, view: ControlView) -> ControlAction:
        self.views.append(view)
        if view.now_ns >= 1_000_000_000:
            return ControlAction((("run", "0"),), None)
        return ControlAction((), view.now_ns + 500_000_000)


def test_the_runner_calls_a_controller_and_makes_its_writes() -> None:
    sc = truncate(load_scenario(None), 2_000_000_000)  # the built-in scenario, 2 s of it
    ctl = _Recorder()
    backend = SimBackend()
    try:
        r = run_scenario(sc, backend, controller=ctl)
    finally:
        backend.close()
    assert [v.now_ns for v in ctl.views] == [500_000_000, 1_000_000_000]
    assert ctl.views[0].resident_pages == sc.total_pages() == 12 * 2048
    assert ctl.views[0].knobs["run"] == 1
    # ksmd stopped at 1 s: from then on, nothing is scanned.
    col = {name: i for i, name in enumerate(
        ("time_s", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
         "ksm_zero_pages", "general_profit", "full_scans", "pages_scanned"))}
    after = [row for row in r.timeline if row[0] >= 1.0]
    assert len({row[col["pages_scanned"]] for row in after}) == 1
    assert after[-1][0] > 1.5


def test_ksmtuned_stops_ksmd_on_a_host_with_room() -> None:
    # 1 GiB of host for 4 MiB of guests: committed + thres < total and free > thres.
    sc = load_scenario(EXAMPLES / "identical-pages.toml")
    ctl = KsmtunedController(1 << 30)
    backend = SimBackend()
    try:
        r = run_scenario(sc, backend, controller=ctl)
    finally:
        backend.close()
    assert [a.action for _, a in ctl.log] == ["stop"]
    assert r.timeline[-1][-1] == 0.0  # ksmd never ran: no CPU time


# --- a small sweep on a LocalCluster --------------------------------------------------------------
# Marked linux: Dask's monitors (psutil) read /proc (the workers' stat, net and disk
# counters) and the cgroup limits under /sys; nothing here touches KSM.

@pytest.mark.linux
def test_tune_end_to_end_on_a_local_cluster(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    plot, html = tmp_path / "front.svg", tmp_path / "tune.html"
    code = main(["tune", str(EXAMPLES / "identical-pages.toml"),
                 "--grid", "pages_to_scan=100,1000", "--grid", "sleep_millisecs=20",
                 "--cpu-budget", "5%", "--workers", "2", "--json",
                 "--plot", str(plot), "--html", str(html)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["schema"] == "ksmlab.tune/1"
    assert doc["grid"] == {"pages_to_scan": ["100", "1000"], "sleep_millisecs": ["20"]}
    assert doc["sweep"]["workers"] == 2 and doc["sweep"]["scheduler"] == "local"
    assert doc["partial"] is False and doc["sweep"]["finished"] == 5
    confs = doc["configurations"]
    assert [c["knobs"] for c in confs] == [{"pages_to_scan": "100", "sleep_millisecs": "20"},
                                           {"pages_to_scan": "1000", "sleep_millisecs": "20"}]
    refs = doc["references"]
    assert list(refs) == ["kernel-defaults", "scan-time-advisor", "ksmtuned"]
    # Grid point 0 is the kernel's defaults: the two runs, on whichever workers, agree.
    for key in ("saved_bytes", "ksmd_cpu_s", "pages_volatile", "time_to_90_percent_s"):
        assert confs[0][key] == refs["kernel-defaults"][key]
    # The example's arithmetic: 256 pages identical in 4 processes merge into 256 KSM
    # pages with 768 more mappings; general_profit = 768 x 4096 - 1024 x 64 = 3080192.
    assert confs[0]["saved_bytes"] == 3080192
    assert refs["ksmtuned"]["controller"][0]["time_s"] == 0.0
    rec = doc["recommendation"]
    assert rec["index"] in doc["pareto_front"]
    assert rec["index"] not in rec["equivalent"] and all(0 <= i < 2 for i in rec["equivalent"])
    chosen = confs[rec["index"]]
    assert chosen["ksmd_cpu_percent"] <= 5
    assert all(c["saved_bytes"] <= chosen["saved_bytes"] for c in confs
               if c["ksmd_cpu_percent"] <= 5)
    assert plot.read_bytes().startswith(b"<?xml")
    page = html.read_text()
    assert "ksmlab tune" in page and "data:image/png;base64," in page
