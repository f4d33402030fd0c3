"""The tables the job benchmarks print: jobs, notebook cases and targets, in fixed columns.

Decisions:

- Plain fixed-width text for the terminal, one table per part of the results file, so that a
  script prints the parts it measured followed by every target of the merged file; the
  README's Markdown tables are written from the JSON, not from these.
- A missing figure prints as ``-``: a job that failed or a case not run stays visible as a row.
"""

from __future__ import annotations

from common.results import short


def fmt(value, spec: str = ",.1f") -> str:
    """``value`` formatted with ``spec``; ``-`` for None."""
    return "-" if value is None else format(value, spec)


def jobs_table(rows: list[dict]) -> list[str]:
    """One line per command-line job: sizes, wall and busy seconds, rates and phases.

    Parameters
    ----------
    rows
        The results file's ``rows``.

    Returns
    -------
    list of str
        The header and one line per row.
    """
    lines = [
        f"{'model':<6} {'workload':<8} {'gpus':>4} {'run':<6} {'seqs':>7} {'tokens':>11} "
        f"{'wall s':>8} {'busy s':>7} {'wall tok/s':>11} {'steady tok/s':>12} {'src':<7} "
        f"{'wall/steady':>11} phases (s; other: interpreter, imports, exit)"
    ]
    for r in rows:
        phases = dict(r.get("phases_logged") or r["phases"] or {})
        if r.get("outside_phases_seconds") is not None:
            phases["other"] = r["outside_phases_seconds"]
        phase_text = " ".join(
            f"{k}={v:.1f}" for k, v in phases.items() if isinstance(v, int | float)
        )
        lines.append(
            f"{short(r['model']):<6} {r['workload']:<8} {r['gpus']:>4} {r['run']:<6} "
            f"{r['sequences']:>7,} {r['tokens']:>11,} {fmt(r['wall_seconds'], '.2f'):>8} "
            f"{fmt(r['gpu_busy_seconds']):>7} {fmt(r['wall_tokens_per_s'], ',.0f'):>11} "
            f"{fmt(r['steady_tokens_per_s'], ',.0f'):>12} {r['steady_source'] or '-':<7} "
            f"{fmt(r['wall_over_steady'], '.3f'):>11} {phase_text or '-'}"
        )
    return lines


def notebook_table(notebooks: list[dict]) -> list[str]:
    """One line per notebook case: workers, cluster start, first and second ``embed()``.

    Parameters
    ----------
    notebooks
        The results file's ``notebook`` cases.

    Returns
    -------
    list of str
        The header and one line per case.
    """
    lines = [
        f"{'notebook':<8} {'workers':>7} {'cluster s':>9} {'first s':>8} "
        f"{'second s':>8} {'resident':>8}",
    ]
    for b in notebooks:
        lines.append(
            f"{short(b['model']):<8} {fmt(b.get('workers'), 'd'):>7} "
            f"{fmt(b.get('cluster_start_seconds'), '.2f'):>9} "
            f"{fmt(b.get('first_seconds'), '.2f'):>8} "
            f"{fmt(b.get('second_seconds'), '.2f'):>8} "
            f"{str(b.get('nothing_reloaded', '-')):>8}"
        )
    return lines


def targets_table(goals: list[dict]) -> list[str]:
    """One line per target: its limit, what was measured, pass, miss or n/a.

    Parameters
    ----------
    goals
        The results file's ``targets``.

    Returns
    -------
    list of str
        The header and one line per target.
    """
    lines = [f"{'target':<46} {'limit':>7} {'measured':>9} {'':<5}"]
    for g in goals:
        lines.append(
            f"{g['target']:<46} {g['limit']:>7.2f} {fmt(g['measured'], '.3f'):>9} {g['result']}"
        )
    return lines


def table(rows: list[dict], notebooks: list[dict], goals: list[dict]) -> str:
    """The whole results file as ``job_wall.py`` prints it: jobs, notebook cases, targets.

    Parameters
    ----------
    rows, notebooks, goals
        The results file's ``rows``, ``notebook`` and ``targets``.

    Returns
    -------
    str
        The tables, a blank line between them; no notebook table without cases.
    """
    lines = jobs_table(rows)
    if notebooks:
        lines += ["", *notebook_table(notebooks)]
    lines += ["", *targets_table(goals)]
    return "\n".join(lines)
