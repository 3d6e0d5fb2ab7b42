"""The metrics sink: metrics.jsonl keeps every record whatever wandb does."""
from __future__ import annotations


def test_a_failing_wandb_never_stops_the_run_and_loses_no_metric(tmp_path, monkeypatch, capsys):
    from pipeline.metrics import MetricsLogger, StepMetrics, read_metrics

    class LostService:                       # what a wandb run does once its service process was killed
        calls = 0

        def log(self, *args, **kwargs):
            LostService.calls += 1
            raise ConnectionResetError("Connection lost")

        def finish(self):
            raise AssertionError("finish must not be called on a run switched off")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(tmp_path, True, "p", "disabled", "id", "name", {})
    logger.wandb_run = LostService()
    for step in (1, 2):
        logger.log(StepMetrics(step=step, loss=1.0, lr=1e-3, grad_norm=1.0, samples_per_s=1.0, tokens_per_s=1.0,
                               target_tokens=4, mfu=None, peak_mem_gb=0.1, data_wait_share=0.0, step_time_s=1.0))
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and LostService.calls == 1
    assert "wandb log failed (ConnectionResetError: Connection lost)" in capsys.readouterr().err
