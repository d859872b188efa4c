"""Draw the loss curve of a training run (``training.json`` written by train.py) as a PNG.

python reference_model/plot_training.py [reference_model/weights]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digitref.plot import Panel, line_chart  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else HERE / "weights")
    record = json.loads((folder / "training.json").read_text())
    losses = [(step, loss) for step, loss in record["losses"]]
    every = losses[1][0] - losses[0][0]
    panel = Panel(
        f"training loss (mean per {every} steps, log scale)", "step", {"flow-matching loss": losses}, True
    )
    line_chart([panel], folder / "loss_curve.png", panel_size=(560, 280))
    print(folder / "loss_curve.png")


if __name__ == "__main__":
    main()
