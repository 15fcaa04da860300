"""The training progress bar on stderr: step, KL, tokens/s, the last validation, ETA."""

from __future__ import annotations

from rich.progress import TextColumn

from .. import console


class TrainProgress:
    """A rich progress bar of the optimizer steps (disabled under --quiet and on ranks > 0)."""

    def __init__(self, total: int, start: int, disable: bool, label: str = "KL", metric: str = "kl"):
        self.disable = disable or console.is_quiet()
        self.progress = console.make_progress(TextColumn("{task.fields[info]}"))
        self.task = self.progress.add_task("distil", total=total, completed=start, info="")
        self.val = ""
        self.label, self.metric = label, metric

    def __enter__(self):
        if not self.disable:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if not self.disable:
            self.progress.stop()

    def update(self, step: int, record: dict[str, float]) -> None:
        info = f"{self.label} {record[self.metric]:.4f}"
        if "tokens_per_s" in record:
            info += f"  {record['tokens_per_s']:,.0f} tok/s"
        info += self.val
        self.progress.update(self.task, completed=step, info=info)

    def note(self, val: dict[str, float]) -> None:
        self.val = f"  val KL {val['val_kl']:.4f}"
