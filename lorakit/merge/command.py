"""`lorakit merge` as one call: one run folded into its base (`fold`), or several runs' adapters combined
first (`combine`), then folded or kept as one adapter; the option rules that depend on how many runs were
given; the tables the command prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError


@dataclass
class Merged:
    report: dict
    output: Path
    adapter_only: bool
    several: bool

    def tables(self) -> list:
        """The combination's figures (several runs) and the verification table (a merged model)."""
        from lorakit.merge import combine, fold

        out = []
        if self.several:
            out.append(combine.report_table(self.report if self.adapter_only else self.report["combination"]))
        if "merged_vs_reference" in self.report.get("verification", {}):
            out.append(fold.report_table(self.report))
        return out


def merge(
    run_dirs: list[Path],
    *,
    output: Path | None,
    dtype: str | None,
    base: str | None,
    merge_into: str | None,
    combination: str | None,
    weights: str | None,
    density: float | None,
    seed: int | None,
    adapter_only: bool,
    verify: bool,
    overwrite: bool,
    console,
    accept_changed_adapter: bool = False,
) -> Merged:
    if merge_into not in (None, "nf4", "original"):
        raise LorakitError(f"--merge-into: expected nf4 or original, got {merge_into!r}")
    several = {
        "--combination": combination,
        "--weights": weights,
        "--density": density,
        "--seed": seed,
        "--adapter-only": adapter_only or None,
    }
    if len(run_dirs) == 1 and any(v is not None for v in several.values()):
        raise LorakitError(
            f"{', '.join(k for k, v in several.items() if v is not None)}: for combining several "
            "runs; give two or more run directories"
        )
    from lorakit.console import quiet_libraries

    quiet_libraries()
    out = str(output) if output else None
    if len(run_dirs) > 1:
        from lorakit.merge import combine

        job = combine.plan(
            run_dirs,
            combination=combination,
            weights=weights,
            density=density,
            seed=seed,
            output=out,
            adapter_only=adapter_only,
            dtype=dtype,
            base=base,
            merge_into=merge_into,
            overwrite=overwrite,
            accept_changed_adapter=accept_changed_adapter,
        )
        report = combine.run(
            job, check=verify, dtype=dtype, base=base, merge_into=merge_into, overwrite=overwrite, console=console
        )
    else:
        from lorakit.merge import fold

        job = fold.plan(
            run_dirs[0],
            output=out,
            dtype=dtype,
            base=base,
            merge_into=merge_into,
            overwrite=overwrite,
            accept_changed_adapter=accept_changed_adapter,
        )
        report = fold.run(job, check=verify)
    return Merged(report, job.output, adapter_only, len(run_dirs) > 1)
