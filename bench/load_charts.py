"""Charts of a load run (``bench/load.py``): one PNG, five panels over time --
event rate, lag, freshness, lookup latency, CPU and memory of the service."""
import matplotlib

matplotlib.use("Agg")                   # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def plot(document, path):
    """Write the figure of ``document`` to ``path`` (a .png); returns the path."""
    series, plan = document["series"], document["plan"]
    t = np.asarray(series["t_s"])
    fig, axes = plt.subplots(5, 1, figsize=(8, 11), sharex=True)
    _event_rate(axes[0], t, series)
    _lag(axes[1], t, series)
    _freshness(axes[2], t, series)
    _lookup_latency(axes[3], t, series)
    _resources(axes[4], t, series)
    for ax in axes:
        ax.axvspan(0, plan["warmup_s"], color="0.9", zorder=0)   # left out of the overall figures
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds since the start of the load (grey: warm-up)")
    overall = document["overall"]
    fig.suptitle(f"Load test: {plan['events_per_s']:,.0f} events/s, "
                 f"{plan['lookups_per_s']:,.0f} lookups/s, {plan['entities']:,} users "
                 f"(achieved {overall['events_achieved_per_s']:,.0f} events/s)", fontsize=10)
    fig.tight_layout()
    _save_small(fig, path)
    plt.close(fig)
    return path


def _save_small(fig, path):
    """A line chart needs few colours: a 64-colour palette PNG is a third of
    the size of the RGBA one matplotlib writes (results are committed)."""
    from io import BytesIO

    from PIL import Image
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    image = Image.open(buffer).convert("RGB").quantize(colors=64)
    image.save(path, format="PNG", optimize=True)


def _values(series, name):
    """A series as floats, None -> NaN (a gap in the line)."""
    return np.array([np.nan if v is None else v for v in series[name]], dtype=float)


def _event_rate(ax, t, series):
    ax.plot(t, _values(series, "events_target_per_s"), "k--", lw=1, label="target")
    ax.plot(t, _values(series, "events_sent_per_s"), label="produced")
    ax.plot(t, _values(series, "events_folded_per_s"), label="folded by tally serve")
    ax.set_ylabel("events/s")
    ax.legend(fontsize=7, loc="lower right")


def _lag(ax, t, series):
    ax.plot(t, _values(series, "unfolded_events"), color="C1", label="produced, not folded")
    ax.plot(t, _values(series, "backlog_messages"), color="C3", lw=1,
            label="broker backlog (acked at checkpoints)")
    ax.set_ylabel("events")
    twin = ax.twinx()
    twin.plot(t, _values(series, "event_time_lag_s"), color="C4", lw=1,
              label="event-time lag (s)")
    twin.set_ylabel("event-time lag, s")
    _legend_of_both(ax, twin)


def _freshness(ax, t, series):
    ax.plot(t, _values(series, "freshness_p50_ms"), label="p50")
    ax.plot(t, _values(series, "freshness_max_ms"), lw=1, label="max")
    ax.set_ylabel("freshness, ms")
    ax.legend(fontsize=7, loc="upper right", title="produced -> visible", title_fontsize=7)


def _lookup_latency(ax, t, series):
    for kind in ("service", "c_api"):
        if f"lookup_{kind}_p50_ms" not in series:
            continue
        for quantile, style in (("p50", "-"), ("p99", "--"), ("p999", ":")):
            ax.plot(t, _values(series, f"lookup_{kind}_{quantile}_ms"), style,
                    color="C0" if kind == "service" else "C2", lw=1,
                    label=f"{kind} {quantile}")
    ax.set_yscale("log")
    ax.set_ylabel("lookup latency, ms")
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def _resources(ax, t, series):
    ax.plot(t, _values(series, "service_cpu_percent"), label="tally serve CPU %")
    ax.plot(t, _values(series, "lookup_server_cpu_percent"), lw=1, label="lookup server CPU %")
    ax.plot(t, _values(series, "broker_cpu_percent"), lw=1, label="broker CPU %")
    ax.plot(t, _values(series, "harness_cpu_percent"), lw=1,
            label="load generators CPU %")
    ax.plot(t, _values(series, "machine_cpu_percent"), "k:", lw=1,
            label="whole machine CPU %")
    ax.set_ylabel("CPU % (100 = a core)")
    twin = ax.twinx()
    twin.plot(t, _values(series, "service_rss_mb"), color="C5", label="tally serve RSS (MB)")
    twin.set_ylabel("RSS, MB")
    _legend_of_both(ax, twin)


def _legend_of_both(ax, twin):
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper left")
