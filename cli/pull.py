"""``edge-llm pull REPO_ID``: a checkpoint from the Hugging Face Hub into the standard Hub cache.

Progress goes to stderr: on a terminal a rich display (overall, and the file in flight: bytes, speed,
time left); otherwise one line per file, so logs stay readable. stdout gets only the snapshot's path.
The same display shows implicit pulls by ``run``/``info`` (``edge_llm.hub.resolve.set_pull_observer``).
"""

from __future__ import annotations

import typer
from rich.errors import LiveError
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from edge_llm.hub.pull import PullObserver, PullPlan, RemoteFile
from edge_llm.hub.pull import pull as pull_repo
from edge_llm.machine.memory import human_bytes

from .common import err, user_errors


class AverageSpeedColumn(ProgressColumn):
    """Bytes per second since the task started. huggingface_hub reports progress once per 10 MB chunk, too
    rarely for rich's windowed estimate (which needs two samples within 30 s)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("?", style="progress.data.speed")
        return Text(f"{decimal(int(task.completed / elapsed))}/s", style="progress.data.speed")


class TimeLeftColumn(ProgressColumn):
    """Time left at the average speed so far."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("done", style="progress.remaining")
        if not task.elapsed or not task.completed or task.total is None:
            return Text("-:--", style="progress.remaining")
        seconds = int((task.total - task.completed) * task.elapsed / task.completed)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}",
                    style="progress.remaining")


class RichPullObserver(PullObserver):
    """Draws a pull on stderr: rich progress on a terminal, plain lines elsewhere."""

    def __init__(self) -> None:
        self.live = err.is_terminal
        self.progress: Progress | None = None
        self.overall: TaskID | None = None
        self.current: dict[str, TaskID] = {}

    def message(self, text: str) -> None:
        err.print(text, style="dim" if self.live else None, highlight=False, soft_wrap=True)

    def start(self, plan: PullPlan) -> None:
        cached = len(plan.cached)
        where = plan.repo_id if plan.revision == "main" else f"{plan.repo_id}@{plan.revision}"
        head = (f"pulling {where} (commit {plan.commit[:12]}): {len(plan.files)} files, "
                f"{human_bytes(plan.download_bytes)} to download")
        err.print(head + (f", {cached} already cached" if cached else ""), highlight=False, soft_wrap=True)
        if not self.live or not plan.download_bytes:
            return
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(bar_width=30), DownloadColumn(),
            AverageSpeedColumn(), TimeLeftColumn(), console=err, transient=True,
        )
        try:
            self.progress.start()
        except LiveError:  # rich < 14.1 cannot nest live displays (run's "loading" spinner): plain lines
            self.progress = None
            return
        self.overall = self.progress.add_task("total", total=plan.download_bytes)

    def file_start(self, file: RemoteFile) -> None:
        if self.progress is not None:
            self.current[file.path] = self.progress.add_task(f"  {file.path}", total=file.size)

    def file_progress(self, file: RemoteFile, nbytes: int) -> None:
        if self.progress is None or file.path not in self.current:
            return
        self.progress.advance(self.current[file.path], nbytes)
        self.progress.advance(self.overall, nbytes)

    def file_done(self, file: RemoteFile, seconds: float) -> None:
        line = f"  {file.path}  {human_bytes(file.size)}  {human_bytes(file.size / max(seconds, 1e-3))}/s"
        if self.progress is not None and file.path in self.current:
            self.progress.remove_task(self.current.pop(file.path))
        err.print(line, highlight=False, soft_wrap=True)  # above the live display while one runs

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@user_errors
def pull(
    repo_id: str = typer.Argument(..., metavar="REPO_ID", show_default=False,
                                  help="Hub repo id (owner/name), e.g. mlx-community/Llama-3.2-1B-Instruct-4bit."),
    revision: str | None = typer.Option(None, "--revision", "-r", metavar="REV",
                                        help="Branch, tag or commit (default: main)."),
    verify: bool = typer.Option(
        False, "--verify", help="Re-hash the cached files against the Hub's checksums; re-download any that differ."
    ),
) -> None:
    """Download a model (config, safetensors weights, tokenizer) into the Hugging Face Hub cache."""
    result = pull_repo(repo_id, revision, verify=verify, observer=RichPullObserver())
    done = f"{result.repo_id}: {len(result.files)} files, {human_bytes(result.downloaded_bytes)} downloaded"
    if result.verified is not None:
        done += f", {result.verified} verified"
        if result.repaired:
            done += f" ({len(result.repaired)} re-downloaded: {', '.join(result.repaired)})"
    if not result.files:
        done = f"{result.repo_id}: already in the cache (offline, not checked against the Hub)"
    err.print(done, highlight=False, soft_wrap=True)
    print(result.path)
