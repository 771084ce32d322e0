"""launch.local builds the torchrun command users would otherwise type."""

from launch.local import main


def test_local_dry_run_prints_torchrun_line(capsys):
    assert main(["--nproc", "3", "--dry-run", "--", "model=tiny", "trainer.max_steps=5"]) == 0
    assert capsys.readouterr().out.strip() == (
        "torchrun --standalone --nproc_per_node=3 -m train model=tiny trainer.max_steps=5"
    )
