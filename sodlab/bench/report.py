"""The bench's report: rows aggregated over seeds, ratios to the baseline, bench.md and two plots."""
from __future__ import annotations

import statistics

from sodlab.bench.methods import PUBLISHED_ABLATION, PUBLISHED_MAIN, Method
from sodlab.evaluate import FINE_BIN_LABELS, PAPER_COLUMNS, STAT_NAMES, format_fine_bins_table, format_table
from sodlab.recipes import learned_note


def gap_closed(aps_method: float | None, aps_baseline: float | None, aps_oracle: float | None) -> float | None:
    """(APs_method - APs_baseline) / (APs_oracle - APs_baseline): 0 at the baseline, 1 at the oracle.

    None without an oracle, when the oracle is not above the baseline (no gap to close: the
    oracle has not learned what its resolution gives, and a negative denominator would flip every
    sign), or when a value is missing or COCO's -1 (no small ground truth). The bootstrap interval
    (bench.stats.paired_differences) leaves such resamples out in the same way.
    """
    values = (aps_method, aps_baseline, aps_oracle)
    if any(v is None or v < 0 for v in values):
        return None
    denominator = aps_oracle - aps_baseline
    if denominator <= 0:
        return None
    return (aps_method - aps_baseline) / denominator


COST_KEYS = ("train_seconds", "train_images_per_s", "train_peak_rss_mb", "infer_ms_per_image",
             "infer_images_per_s", "infer_peak_rss_mb", "parameters")


def _cost(record: dict) -> dict:
    """A record's costs; latency from the interleaved timing of its seed's methods when there is one."""
    t, i = record["training"], record["inference"]
    latency = i["paired"]["median_ms"] if i.get("paired") else i["ms_per_image"]
    return {"train_seconds": t["seconds"], "train_images_per_s": t["images_per_s"],
            "train_peak_rss_mb": t["peak_rss_mb"], "infer_ms_per_image": latency,
            "infer_images_per_s": i.get("images_per_s"), "infer_peak_rss_mb": i["peak_rss_mb"],
            "parameters": i["parameters"]}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds (None for one seed); COCO's -1 (no ground truth) stays -1."""
    if any(v < 0 for v in values):
        return -1.0, None
    return _mean_std_signed(values)


def mean_over_seeds(values: list):
    """The seeds' mean of a json tree (eval.json's "errors" or "tiny"): numbers averaged leaf by
    leaf over the keys every seed has; COCO's -1 (no ground truth) in any seed stays -1; other
    leaves are the first seed's."""
    first = values[0]
    if isinstance(first, dict):
        return {k: mean_over_seeds([v[k] for v in values]) for k in first if all(k in v for v in values)}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(v, (int, float)) for v in values):
        return -1.0 if any(v == -1 for v in values) else statistics.fmean(values)
    return first


def _aggregate_eval(stats: list[dict]) -> tuple[dict, dict | None]:
    mean, std = {}, {}
    for tree in ("errors", "tiny"):  # TIDE and the tiny-object metrics, averaged over seeds
        if all(tree in s for s in stats):
            mean[tree] = mean_over_seeds([s[tree] for s in stats])
    for name in STAT_NAMES:
        mean[name], std[name] = _mean_std([s[name] for s in stats])
    mean["fine_bins"], std["fine_bins"] = {}, {}
    for label in FINE_BIN_LABELS:
        bins = [s["fine_bins"][label] for s in stats]
        mean["fine_bins"][label] = {"num_gt": bins[0]["num_gt"]}
        std["fine_bins"][label] = {}
        for metric in ("AP", "AP50", "AR100"):
            mean["fine_bins"][label][metric], std["fine_bins"][label][metric] = _mean_std([b[metric] for b in bins])
    return mean, (std if len(stats) > 1 else None)


def reconstruction_over_seeds(qualities: list[dict | None]) -> dict | None:
    """The seeds' sr_quality.json (sodlab.sr_quality) as gains over bicubic per size bin: PSNR (dB)
    and SSIM of the SR patch minus bicubic's, mean and std over seeds, and the RoIs of each bin.
    None unless every seed has one (SR variants only; benches written before it was measured)."""
    if not qualities or any(not q or not q.get("bins") for q in qualities):
        return None
    labels = [label for label in qualities[0]["bins"] if all(label in q["bins"] for q in qualities)]
    out = {"method": qualities[0].get("method"), "bins": {}}
    for label in labels:
        bins = [q["bins"][label] for q in qualities]
        entry = {"rois": bins[0]["rois"]}
        for metric in ("psnr", "ssim"):
            mean, std = _mean_std_signed([b["sr"][metric] - b["bicubic"][metric] for b in bins])
            entry[metric] = {"gain": mean, "std": std}
        out["bins"][label] = entry
    return out


def _mean_std_signed(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds (None for one seed) of values that may be negative."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[dict], methods: list[Method], presets: tuple[str, ...]) -> list[dict]:
    """One row per (preset, method): eval mean (+ std), cost means, ratios to the baseline, gap closed."""
    rows = []
    for preset_name in presets:
        by_method = {m.name: [r for r in records if r["method"] == m.name and r["preset"] == preset_name]
                     for m in methods}
        preset_rows = {}
        for method in methods:
            group = by_method[method.name]
            if not group:
                continue
            eval_mean, eval_std = _aggregate_eval([r["eval"] for r in group])
            costs = [_cost(r) for r in group]
            cost = {k: statistics.fmean(c[k] for c in costs) if all(c[k] is not None for c in costs) else None
                    for k in COST_KEYS}
            cost["parameters"] = round(cost["parameters"])
            training = group[0]["training"]
            preset_rows[method.name] = {
                "method": method.name, "description": method.description, "preset": preset_name,
                "backbone": group[0]["backbone"], "seeds": len(group), "eval": eval_mean, "eval_std": eval_std,
                "budget": {"iters": training["iters"], "batch_size": training["batch_size"],
                           "images_seen": training["images_seen"], "train_seconds": cost["train_seconds"],
                           "reused_from": "baseline" if method.reuse else None},
                "cost": cost, "slices_per_image": group[0]["inference"].get("slices_per_image"),
                "shares_detector": method.shares_detector,
                # upscale and the HR oracle, when the budget branches them off the seed's baseline run
                "branch_point": (training.get("branched_from") or {}).get("iteration"),
                # each seed's latency ratio from its interleaved timing (bench.measure.interleaved_latency)
                "paired_latency_ratio": statistics.fmean(r["inference"]["paired"]["ratio"] for r in group)
                if all(r["inference"].get("paired") for r in group) else None,
                "sr_quality": reconstruction_over_seeds([r["inference"].get("sr_quality") for r in group]),
            }
        base, oracle = preset_rows.get("baseline"), preset_rows.get("hr-oracle")
        for row in preset_rows.values():
            row["vs_baseline"] = {k: _ratio(row["cost"][k], base["cost"][k]) for k in COST_KEYS}
            if row["paired_latency_ratio"] is not None:
                row["vs_baseline"]["infer_ms_per_image"] = row["paired_latency_ratio"]
            # an SR variant's own training is its branch, a branched detector's its last iterations;
            # with the baseline's part they start from, counted once in the bench's total (for a
            # branch, the baseline's time pro rata of the iterations they share)
            shared = 1.0 if row["shares_detector"] else (row["branch_point"] or 0) / base["budget"]["iters"]
            row["train_seconds_with_detector"] = row["cost"]["train_seconds"] + shared * base["cost"]["train_seconds"]
            row["gap_closed"] = gap_closed(row["eval"]["APs"], base["eval"]["APs"],
                                           oracle["eval"]["APs"] if oracle else None)
        rows.extend(preset_rows.values())
    return rows


def sharing_saved(rows: list[dict]) -> list[str]:
    """What sharing each seed's detector saved, per preset, computed from the measured training
    times: without it every SR variant would train its own detector, as long as the baseline's."""
    lines = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        group = [r for r in rows if r["preset"] == preset]
        base = next(r for r in group if r["method"] == "baseline")
        sharing = [r for r in group if r["shares_detector"]]
        detector = base["cost"]["train_seconds"]
        if not sharing or detector is None:
            continue
        trained = sum(r["cost"]["train_seconds"] or 0.0 for r in group if not r["budget"]["reused_from"])
        saved = len(sharing) * detector
        label = f" ({preset})" if len({r["preset"] for r in rows}) > 1 else ""
        lines.append(f"Sharing the detector{label}: the {len(sharing)} SR variants train their branches on the "
                     f"seed's baseline detector ({detector / 60:.1f} min of training), so each seed trains it once. "
                     f"Training a detector for each would cost {saved / 60:.1f} min more per seed: the bench's "
                     f"training, {trained / 60:.1f} min per seed, would be {(trained + saved) / 60:.1f} min.")
        lines += branching_saved(group, label)
    return lines


def branching_saved(group: list[dict], label: str) -> list[str]:
    """What branching upscale and the HR oracle off the baseline's run saved: their training from
    scratch for all the budget's iterations, estimated from their own measured time per iteration."""
    branched = [r for r in group if r.get("branch_point") and r["cost"]["train_seconds"]]
    if not branched:
        return []
    own = [r["budget"]["iters"] - r["branch_point"] for r in branched]
    scratch = sum(r["cost"]["train_seconds"] * r["budget"]["iters"] / n for r, n in zip(branched, own))
    spent = sum(r["cost"]["train_seconds"] for r in branched)
    names = " and ".join(f"`{r['method']}`" for r in branched)
    points = "/".join(str(p) for p in sorted({r["branch_point"] for r in branched}))
    return [f"Branching{label}: {names} share the seed's baseline run up to iteration {points} and train its "
            f"last {'/'.join(str(n) for n in sorted(set(own)))} "
            f"iterations at their larger input, {spent / 60:.1f} min in all. From scratch for all "
            f"{branched[0]['budget']['iters']} iterations they would take about {scratch / 60:.1f} min (estimated "
            "from their measured time per iteration)."]


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


# --- report ---------------------------------------------------------------------------------------

def _published(rows) -> list[tuple[str, str, dict]]:
    return [(name, backbone, {c: v / 100 for c, v in zip(PAPER_COLUMNS, values)}) for name, backbone, values in rows]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def cost_table(rows: list[dict]) -> str:
    headers = ["Methods", "Backbone", "iters", "images seen", "train s", "with its detector", "train img/s", "x",
               "infer ms/img (batch 1)", "x", "eval img/s", "x", "slices x ms/slice", "train peak RSS MB", "x",
               "infer peak RSS MB", "x", "params M", "x", "gap closed (APs)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        c, r, b = row["cost"], row["vs_baseline"], row["budget"]
        reused = " (baseline's)" if b["reused_from"] else ""
        slices = row.get("slices_per_image")
        per_slice = f"{slices} x {c['infer_ms_per_image'] / slices:.1f}" if slices else ""
        cells = [row["method"], row["backbone"], str(b["iters"]) + reused, str(b["images_seen"]),
                 _fmt(c["train_seconds"], 0), _fmt(row.get("train_seconds_with_detector"), 0),
                 _fmt(c["train_images_per_s"], 2), _fmt(r["train_images_per_s"], 2),
                 _fmt(c["infer_ms_per_image"]), _fmt(r["infer_ms_per_image"], 2),
                 _fmt(c["infer_images_per_s"], 2), _fmt(r["infer_images_per_s"], 2), per_slice,
                 _fmt(c["train_peak_rss_mb"], 0), _fmt(r["train_peak_rss_mb"], 2),
                 _fmt(c["infer_peak_rss_mb"], 0), _fmt(r["infer_peak_rss_mb"], 2),
                 _fmt(c["parameters"] / 1e6, 2), _fmt(r["parameters"], 2), _fmt(row["gap_closed"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value: float, digits: int = 1) -> str:
    return f"{100 * value:+.{digits}f}"


def verdict(rows: list[dict], learned_ap: float | None = None, budget_name: str = "") -> str:
    """The bench in a paragraph, computed from its numbers: which methods beat the baseline on APs,
    significantly or not (the paired bootstrap interval), by how much, and at what cost: inference
    time, and APm or APl lost by more than a point.
    With ``learned_ap`` (the budget's claim, in percent), a baseline below it is called out first."""
    parts = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        group = [r for r in rows if r["preset"] == preset]
        base = next(r for r in group if r["method"] == "baseline")
        better, within, worse = [], [], []
        for row in group:
            if row["method"] == "baseline" or row["eval"]["APs"] < 0 or base["eval"]["APs"] < 0:
                continue
            diff = row["eval"]["APs"] - base["eval"]["APs"]
            ci = (row.get("intervals") or {}).get("APs")
            cost = row["vs_baseline"]["infer_ms_per_image"]
            text = f"`{row['method']}` ({_signed(diff)}"
            text += f" [{_signed(ci['low'])}, {_signed(ci['high'])}]" if ci else " (no interval)"
            text += f", {cost:.2f}x the latency" if cost is not None else ""
            lost = [f"{100 * (base['eval'][k] - row['eval'][k]):.1f} {k}" for k in ("APm", "APl")
                    if min(row["eval"].get(k, -1), base["eval"].get(k, -1)) >= 0
                    and base["eval"][k] - row["eval"][k] > 0.01]
            text += f", losing {' and '.join(lost)})" if lost else ")"
            if ci and ci["significant"]:
                (better if diff > 0 else worse).append(text)
            else:
                within.append(text)
        label = f" ({preset})" if len({r["preset"] for r in rows}) > 1 else ""
        sentence = f"**Verdict{label}.**"
        if note := learned_note(learned_ap, 100 * base["eval"]["AP"], budget_name):
            sentence += f" **{note}**"
        sentence += (f" On APs (points against the baseline's {100 * base['eval']['APs']:.1f}, "
                     "with the 95% paired bootstrap interval over val images):")
        sentence += f" significantly better: {', '.join(better)}." if better else " no method is significantly better."
        if within:
            sentence += f" Within the noise: {', '.join(within)}."
        if worse:
            sentence += f" Significantly worse: {', '.join(worse)}."
        oracle = next((r for r in group if r["method"] == "hr-oracle"), None)
        if oracle is not None and 0 <= oracle["eval"]["APs"] <= base["eval"]["APs"]:
            sentence += (f" **The HR oracle is not above the baseline on APs ({100 * oracle['eval']['APs']:.1f} "
                         f"against {100 * base['eval']['APs']:.1f})**: at this budget the detectors have not "
                         "learned what resolution gives, so there is no gap to close and these rows are no "
                         "test of the methods; train longer (--iters).")
        parts.append(sentence + score_matched_verdict(group) + generator_verdict(group) + patch_sources_verdict(group)
                     + reconstruction_verdict(group))
    return "\n\n".join(parts)


def generator_verdict(group: list[dict]) -> str:
    """The verdict's last sentence: whether G earns its place, `sr` against `sr-no-recon` (D on
    bilinear-upsampled patches) on APs, from the ablation's paired interval."""
    row = next((r for r in group if r["method"] == "sr-no-recon"), None)
    ci = ((row or {}).get("intervals") or {}).get("ablation", {}).get("APs")
    if not ci:
        return ""
    finding = ("significantly more" if ci["low"] > 0 else "significantly less" if ci["high"] < 0
               else "no significant difference")
    return (f" **What G adds:** `sr` against `sr-no-recon` (the same branch without G), APs "
            f"{_signed(ci['point'])} [{_signed(ci['low'])}, {_signed(ci['high'])}]: {finding}.")


def patch_sources_verdict(group: list[dict]) -> str:
    """The verdict's clause on the ceiling: with `sr`'s D held fixed, what G's patches and the exact
    twins' (a perfect G) each add over bilinear ones on APs, and G's share of that ceiling."""
    row = next((r for r in group if r["method"] == "sr"), None)
    summary = ((row or {}).get("intervals") or {}).get("patch_sources")
    if not summary or "twin" not in summary:
        return ""
    g, twin = summary["generator"]["APs"], summary["twin"]["APs"]
    share = (f"; G holds {g['point'] / twin['point']:.0%} of that ceiling" if twin["point"] > 0 and twin["significant"]
             else "; a perfect G adds nothing significant here, so no G could")
    return (f" **How much any G could give:** with `sr`'s D held fixed, the exact twins' patches (a perfect G) "
            f"give {_signed(twin['point'], 2)} APs [{_signed(twin['low'], 2)}, {_signed(twin['high'], 2)}] over "
            f"bilinear ones, and G's give {_signed(g['point'], 2)} [{_signed(g['low'], 2)}, "
            f"{_signed(g['high'], 2)}]{share}.")


def reconstruction_verdict(group: list[dict]) -> str:
    """The verdict's last clause: how far G's patches are above bicubic's on held-out small RoIs,
    per size bin (sr_quality.json of the `sr` rows), so that what G adds to detection reads beside
    what it adds to the pixels."""
    row = next((r for r in group if r["method"] == "sr"), None)
    quality = (row or {}).get("sr_quality")
    if not quality or not quality["bins"]:
        return ""
    labels = list(quality["bins"])
    gains = " / ".join(f"{quality['bins'][label]['psnr']['gain']:+.2f}" for label in labels)
    return (f" `sr`'s G against bicubic on held-out small RoIs: {gains} dB PSNR "
            f"({' / '.join(labels)} px).")


def score_matched_verdict(group: list[dict]) -> str:
    """The verdict's second sentence: each method against the baseline with its small detections'
    scores on the method's scale (bench.stats.match_small_scores), which credits ranking only."""
    better, within, worse = [], [], []
    for row in group:
        ci = (row.get("intervals") or {}).get("APs_vs_score_matched")
        if row["method"] == "baseline" or not ci:
            continue
        text = f"`{row['method']}` ({_signed(ci['point'])} [{_signed(ci['low'])}, {_signed(ci['high'])}])"
        (better if ci["low"] > 0 else worse if ci["high"] < 0 else within).append(text)
    if not (better or within or worse):
        return ""
    sentence = (" Against the score-matched baseline (its small detections' scores on each method's scale, "
                "since a lower small-score scale alone raises COCO's APs), APs is")
    groups = [(better, "significantly higher for"), (within, "within the noise for"), (worse, "significantly lower for")]
    return sentence + ";".join(f" {words} {', '.join(items)}" for items, words in groups if items) + "."


def interval_table(rows: list[dict]) -> str:
    """Each method's AP and APs difference to the baseline, with its interval; * marks significance."""
    headers = ["Methods", "Backbone", "AP - baseline", "95% interval", "APs - baseline", "95% interval",
               "gap closed (APs)", "95% interval", "APs - score-matched baseline", "95% interval"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if row["method"] == "baseline" or not row.get("intervals"):
            continue
        cells = [row["method"], row["backbone"]]
        base = next(r for r in rows if r["preset"] == row["preset"] and r["method"] == "baseline")
        for key in ("AP", "APs"):
            ci = row["intervals"].get(key)
            diff = _signed(row["eval"][key] - base["eval"][key]) + ("*" if ci and ci["significant"] else "")
            cells += [diff, f"[{_signed(ci['low'])}, {_signed(ci['high'])}]" if ci else ""]
        gap = row["intervals"].get("gap_closed")
        cells += [_fmt(row["gap_closed"], 2), f"[{gap['low']:.2f}, {gap['high']:.2f}]" if gap else ""]
        matched = row["intervals"].get("APs_vs_score_matched")
        cells += [_signed(matched["point"]) + ("*" if matched["significant"] else ""),
                  f"[{_signed(matched['low'])}, {_signed(matched['high'])}]"] if matched else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    """``sr`` minus each ablated SR variant, with the paired interval; "" without such pairs."""
    headers = ["Variant", "Backbone", "what it changes", "sr - variant: AP", "95% interval", "APs", "95% interval",
               "AP75 small", "95% interval"]
    lines = []
    for row in rows:
        ablation = (row.get("intervals") or {}).get("ablation")
        if not ablation:
            continue
        cells = [row["method"], row["backbone"], row["description"]]
        for key in ("AP", "APs", "AP75s"):
            ci = ablation[key]
            cells += [_signed(ci["point"]) + ("*" if ci["significant"] else ""),
                      f"[{_signed(ci['low'])}, {_signed(ci['high'])}]"]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|", *lines])


def patch_sources_table(rows: list[dict], records: list[dict]) -> str:
    """`sr`'s D held fixed on three patch sources: APs per seed, and G's and a perfect G's gain over
    bilinear patches (points; the pooled row with its paired interval); "" when not measured."""
    headers = ["`sr`", "Backbone", "APs, D on bilinear patches", "on G's", "on the exact twins' (a perfect G)",
               "G - bilinear", "twins - bilinear", "G's share"]
    lines = []
    for row in rows:
        summary = (row.get("intervals") or {}).get("patch_sources") if row["method"] == "sr" else None
        if not summary:
            continue
        for record in records:
            sources = record.get("patch_sources") if (record["preset"], record["method"]) == (row["preset"], "sr") else None
            if not sources:
                continue
            aps = {"generator": record["eval"]["APs"], **{name: entry["eval"]["APs"] for name, entry in sources.items()}}
            g, twin = aps["generator"] - aps["bilinear"], aps["twin"] - aps["bilinear"] if "twin" in aps else None
            lines.append("| " + " | ".join([
                f"seed {record['seed']}", row["backbone"], _fmt(100 * aps["bilinear"], 2), _fmt(100 * aps["generator"], 2),
                _fmt(100 * aps["twin"], 2) if twin is not None else "", _signed(g, 2),
                _signed(twin, 2) if twin is not None else "", f"{g / twin:.0%}" if twin and twin > 0 else ""]) + " |")
        cells = []
        for name in ("generator", "twin"):
            ci = summary.get(name, {}).get("APs")
            cells.append(f"{_signed(ci['point'], 2)}{'*' if ci['significant'] else ''} [{_signed(ci['low'], 2)}, "
                         f"{_signed(ci['high'], 2)}]" if ci else "")
        twin = summary.get("twin", {}).get("APs")
        share = f"{summary['generator']['APs']['point'] / twin['point']:.0%}" if twin and twin["point"] > 0 else ""
        lines.append("| " + " | ".join([f"mean of {summary['generator']['APs']['seeds']} (interval)", row["backbone"],
                                         "", "", "", *cells, share]) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|", *lines])


def reconstruction_table(rows: list[dict]) -> str:
    """Each SR variant's patches against bicubic per size bin (PSNR dB, SSIM), mean +- std over
    seeds; "" when no row has them."""
    measured = [row for row in rows if row.get("sr_quality")]
    if not measured:
        return ""
    labels = list(dict.fromkeys(label for row in measured for label in row["sr_quality"]["bins"]))

    def cell(entry: dict | None, metric: str, digits: int) -> str:
        if entry is None:
            return ""
        gain, std = entry[metric]["gain"], entry[metric]["std"]
        return f"{gain:+.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    headers = (["Variant", "Backbone", "patch"] + [f"PSNR {label} px (dB)" for label in labels]
               + [f"SSIM {label} px" for label in labels] + ["RoIs per bin"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in measured:
        bins = row["sr_quality"]["bins"]
        cells = ([row["method"], row["backbone"], row["sr_quality"]["method"] or ""]
                 + [cell(bins.get(label), "psnr", 2) for label in labels]
                 + [cell(bins.get(label), "ssim", 3) for label in labels]
                 + [" / ".join(str(bins[label]["rois"]) if label in bins else "0" for label in labels)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(records: list[dict]) -> str:
    from sodlab.evaluate import format_table

    return format_table([(f"{r['method']} (seed {r['seed']})", r["backbone"], r["eval"]) for r in records])


# How the gate chooses its k proposals (SRConfig.gate_rank), as bench.md says it.
GATE_RANKS = {"foreground": "those the box head finds most likely foreground",
              "objectness": "the RPN's likeliest objects",
              "both": "the best by the sum of their ranks by the box head's foreground probability and by the "
                      "RPN's objectness"}


def gate_sharing(header: dict) -> str:
    """How the gate spreads D's answers (SRConfig.gate_share_iou), as a clause of the SR methods' line."""
    t = header.get("sr_gate_share_iou", 0.0)
    if not t:
        return ""
    return (f", one per object (none overlapping a better-ranked one at IoU above {t:g}), and the small proposals "
            f"overlapping one of them above {t:g} take its answers")


def sr_precision(header: dict) -> str:
    """How G and D ran at inference (SRConfig.amp), as a clause of the SR methods' line."""
    if "sr_amp" not in header:  # benches written before G and D could run under autocast
        return ""
    if not header["sr_amp"]:
        return "; G and D at inference in float32 (amp off)"
    if header["environment"].get("device") == "cuda":
        return "; G and D at inference in float16 autocast"
    if header["environment"].get("bf16"):
        return "; G and D at inference in bfloat16 autocast (this CPU has native bf16)"
    return "; G and D at inference in float32 (this CPU has no native bf16, so autocast stays off)"


def sr_passes(records: list[dict]) -> str:
    """How the SR variants' runs were trained, as their records say (a resumed bench may mix both)."""
    in_pass = {bool(r["training"].get("one_pass")) for r in records if r["training"].get("shared_detector")}
    if in_pass == {True}:
        return ("; they train in one pass over the same batches, sharing each batch's loading, the detector's "
                "forward and D's read of the real patches, and each run is bitwise what it would be alone; a pass's "
                "time is split between them by their logged steps, the shared work evenly; they are evaluated in "
                "one pass over the val images too, sharing the detector's part of inference, with each run's "
                "detections exactly its own evaluation's")
    if in_pass == {False}:
        return "; each in a pass of its own"
    return "; some in one pass over the same batches, the others each in a pass of its own" if in_pass else ""


def format_bench_markdown(header: dict, rows: list[dict], records: list[dict] | None = None) -> str:
    budget = header["budget"]
    seeds = budget["seeds"]
    table_rows = [(row["method"], row["backbone"], row["eval"]) for row in rows]
    sahi = header["sahi"]
    parts = [
        f"# sodlab bench: {header['name']}",
        "",
        verdict(rows, header.get("learned_ap"), budget["name"]),
        "",
        f"- budget `{budget['name']}`: {budget['iters']} iterations x batch {budget['batch_size']} = "
        f"**{header['images_seen_per_method']} training images seen by every trained detector** (same images, "
        f"same order, same detector preset); each SR variant then trains its branch for {budget['sr_iters']} "
        f"iterations on the same seed's baseline detector, frozen (the staged schedule: the rows of a seed share "
        f"one detector, whose training is counted once{sr_passes(records or [])}); "
        f"{budget['optimizer']} lr {budget['lr']}, "
        f"{budget['schedule']} schedule, {budget['warmup_iters']} warm-up iterations"
        + (f"; `upscale` and the HR oracle share the seed's baseline run (its weights, optimizer and batches) up "
           f"to iteration {budget['iters'] - budget['hires_branch_iters']} and train its last "
           f"{budget['hires_branch_iters']} iterations at their larger input, on the same schedule"
           + (f" (every detector's cosine restarts at that iteration from {budget['hires_branch_lr_restart']:g} x "
              "lr, SGDR's warm restart: the x2 detectors learn their new input at a useful rate, and the baseline "
              "has the same schedule)" if budget.get("hires_branch_lr_restart") else "")
           + ": the same budget, with most of it trained once, since their steps cost several of the baseline's"
           if budget.get("hires_branch_iters") else "")
        + "; the detector's step "
        + ("in bfloat16 autocast where the CPU has native bf16 (float32 elsewhere)" if budget.get("amp", True)
           else "in float32 (`--no-amp`: what a CPU without bf16 runs)"),
        f"- SR methods: HR patches from the {header['sr_hr_source']}; D's class scores and boxes on small "
        f"proposals {'are averaged with' if header.get('sr_fusion') == 'mean' else 'replace'} the box head's "
        f"(fusion `{header.get('sr_fusion', 'replace')}`)" + (
            f"; gated: only {header['sr_gate_top_k']} small proposals per image go through G and D, "
            f"{GATE_RANKS[header.get('sr_gate_rank', 'foreground')]}" + gate_sharing(header) if header.get("sr_gate_top_k")
            else "; ungated: every small proposal goes through G and D") + sr_precision(header) + (
            "; D built on the detector: the seed's trained detector reads each patch, and D's heads start as its "
            "box head" if header.get("sr_discriminator_trunk") == "detector" else
            "; D built on the detector: a copy of the seed's trained backbone and FPN reads each patch, and D "
            "fine-tunes it with heads that start as the detector's box head"
            if header.get("sr_discriminator_trunk") == "detector-tuned" else
            f"; D: a {header.get('sr_discriminator_trunk', 'compact')} CNN trained from scratch")
        + (f"; G super-resolves x{header['sr_scale']}" if "sr_scale" in header else ""),
        f"- data: `{header['data']}` ({header['evaluated_images']} of {header['val_images']} val images evaluated); "
        f"seeds: {seeds}" + (" (mean; std in the second table)" if seeds > 1 else ""),
        f"- evaluation: whole images, each resized by its own detector (the oracle's {header['oracle']['scale']}x "
        "larger ones by a detector that many times larger), unsliced except in the SAHI row; COCOeval against "
        f"`{header['data']}/annotations/instances_{budget['val_split']}.json`, the ground truth at the data's own "
        "resolution (the oracle's boxes mapped back to it)",
        f"- SAHI {sahi['package_version']}: {sahi['slice']}x{sahi['slice']} px slices, overlap {sahi['overlap']}, "
        f"each resized by the detector to its min_size, plus one full-image pass; merged by class-wise "
        f"{sahi['postprocess_type']} at {sahi['postprocess_match_metric']} {sahi['postprocess_match_threshold']}",
        f"- inference: batch 1, median over {budget['timing_images']} images after {budget['timing_warmup']} "
        "warm-up, timed after all training with every method of a seed loaded in one process and timed in turns "
        "(rounds of a few images each, in a rotating order), so that a drift of the machine's speed falls on "
        f"all of them alike; torch threads {header['torch_threads']}; peak RSS is VmHWM of "
        + ("a fresh process per training / inference" if header["isolated_processes"]
           else "this process, reset before each measurement")
        + " (inference's from after loading: the model, the decoded images and batch 1's activations)",
        f"- {header['environment']['device']}, {header['environment']['cpus']} CPUs, torch "
        f"{header['environment']['torch']}, git {header['environment']['git']}; bench took "
        f"{header.get('seconds', 0) / 60:.1f} min" + (
            f" in its last invocation, which reused {header['reused_records']} methods' runs finished by an "
            "earlier, interrupted one (their training and evaluation are not in that time)"
            if header.get("reused_records") else ""),
        *[f"- {note}" for note in header["notes"]],
        "",
        "## Accuracy (COCO AP, percent): this bench",
        "",
        format_table(table_rows),
        "",
        "## Differences to the baseline (points), paired bootstrap over val images",
        "",
        f"Each seed's val images resampled {header.get('bootstrap_resamples', 1000)} times with replacement; both "
        "methods of a seed scored on the same resample; the seeds' differences averaged per resample. "
        "* = the 95% interval excludes 0. The score-matched baseline is the baseline with its small detections' "
        "scores moved onto the method's small-score scale (a strictly increasing map, so their order stays): "
        "COCO's APs ignores unmatched detections above the small range, so a lower small-score scale alone "
        "raises APs and lowers AP. A method that beats the baseline but not the score-matched baseline gains "
        "by its score scale, not by ranking small objects better.",
        "",
        interval_table(rows),
    ]
    if ablation := ablation_table(rows):
        parts += ["", "## The SR branch's ablation: `sr` minus each variant (points), paired bootstrap", "",
                  "Each variant changes one part of `sr` and trains on the same detector, so a positive difference "
                  "is what that part adds: `sr-no-recon` G, `sr-no-adv` the adversarial term, `sr-no-cls` the class "
                  "terms, `sr-cls-only` D's boxes (AP75 small is where the paper says SR should serve box "
                  "regression). Points are the seeds' mean; resamples and * as above.", "", ablation]
    if patch_table := patch_sources_table(rows, records or []):
        parts += ["", "## How much any G could give: `sr`'s D on other patches, paired bootstrap", "",
                  "Each seed's `sr` evaluated again with its D held fixed (`sodlab eval --sr-patches`, into the run's "
                  "evals/ folder): on bilinear patches (G bypassed) and on the same boxes cut from the data's exact "
                  "twins, which a perfect G would give. twins - bilinear is the most any reconstruction could add to "
                  "this D; G - bilinear is what this G adds (it differs from `sr` - `sr-no-recon`, whose D also trained "
                  "on bilinear patches). Points; resamples and * as above.", "", patch_table]
    if reconstruction := reconstruction_table(rows):
        parts += ["", "## Reconstruction: each SR variant's patches minus bicubic's, on held-out small RoIs", "",
                  "The val split's small ground-truth boxes, cut as inference cuts them (z_LR), against the same box "
                  "in the exact twin (z_HR); G's output (bilinear upsampling in `sr-no-recon`, which has no G) minus "
                  "bicubic upsampling of the same z_LR, by box side. Mean ± std over seeds (sr_quality.json of each "
                  "run).", "", reconstruction]
    if records and seeds > 1:
        parts += ["", "Per seed:", "", per_seed_table(records)]
    if records and any("errors" in r["eval"] for r in records):
        from sodlab.evaluate import format_errors_table
        from sodlab.viz import loc_comparison

        averaged = [(row["method"], row["backbone"], row["eval"]) for row in rows
                    if row["preset"] == rows[0]["preset"] and "errors" in row["eval"]]
        over = "seed 0" if seeds == 1 else f"mean over {seeds} seeds"
        parts += ["", f"## Which errors each method makes on small objects (TIDE, {over})", "",
                  "dAP: AP50 points gained if every error of that type were fixed (Bolya et al. 2020; foreground "
                  "IoU 0.5, background IoU 0.1); # counts the errors. errors.png has the fine bins.", "",
                  format_errors_table(averaged), "", loc_comparison([(m, e) for m, _, e in averaged])]
    if seeds > 1:
        parts += ["", f"Standard deviation over {seeds} seeds:", "",
                  format_table([(row["method"], row["backbone"], row["eval_std"]) for row in rows])]
    parts += [
        "",
        "## Published on COCO (Gu et al.), not comparable",
        "",
        "COCO at 800 px with ImageNet-pretrained ResNets, from the paper; a different dataset, scale and "
        "budget from this bench. `cf.` names the nearest row above, not the same method.",
        "",
        format_table(_published(PUBLISHED_MAIN)),
        "",
        "Ablation (published on COCO (Gu et al.), not comparable):",
        "",
        format_table(_published(PUBLISHED_ABLATION)),
        "",
        "## AP by object size (fine bins of sqrt(area), percent)",
        "",
        format_fine_bins_table(table_rows),
        "",
        "## Cost, as ratios (x) to the baseline of this bench",
        "",
        "gap closed = (APs - APs baseline) / (APs oracle - APs baseline). SAHI reuses the baseline's training. An "
        "SR variant's train s is its branch alone; \"with its detector\" adds the seed's baseline training it "
        "stands on (shared by every SR variant, so the bench trains it once). eval img/s: the batched evaluation "
        "over the val images. SAHI: slices per image (with the full-image pass) x ms per slice.",
        "",
        cost_table(rows),
        "",
        *[line + "\n" for line in sharing_saved(rows)],
        "## Methods",
        "",
        *[f"- `{row['method']}`: {row['description']}" for row in rows if row["preset"] == rows[0]["preset"]],
        "",
    ]
    return "\n".join(parts)


def _label(row: dict, rows: list[dict]) -> str:
    return row["method"] if len({r["preset"] for r in rows}) == 1 else f"{row['method']} ({row['preset']})"


def plot_ap_by_size(rows: list[dict]) -> bytes:
    """AP per fine size bin, one line per method (and preset), with std bars over seeds."""
    from sodlab.viz import figure_png, plot_ap_by_size as plot

    return figure_png(plot([(_label(r, rows), r["eval"]) for r in rows],
                           errors={_label(r, rows): r["eval_std"] for r in rows}), dpi=120)


def plot_errors(rows: list[dict]) -> bytes:
    """TIDE's dAP per error type, stacked per method, for small objects and each fine bin (mean over seeds)."""
    from sodlab.viz import figure_png, plot_error_bars

    return figure_png(plot_error_bars([(_label(r, rows), r["eval"]) for r in rows if "errors" in r["eval"]]), dpi=120)


def plot_speed_accuracy(rows: list[dict]) -> bytes:
    """APs against inference ms/image, one point per method (and preset)."""
    from sodlab.viz import figure_png, plot_speed_accuracy as plot

    return figure_png(plot([(_label(r, rows), r["cost"]["infer_ms_per_image"], r["eval"]["APs"],
                             r["eval_std"]["APs"] if r["eval_std"] else None) for r in rows]), dpi=120)
