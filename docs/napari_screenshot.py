r"""Takes docs/napari_predict.png: the Predict widget after predicting the demo scan, headless.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/napari-shot
    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_screenshot.py \
        --model=/tmp/napari-shot/model --scan=/tmp/napari-shot/data/scan_002 \
        --out=docs/napari_predict.png

The window is real (Qt's xcb platform on the virtual X display), so napari's OpenGL canvas is
drawn; Qt's offscreen platform would leave the canvas blank. Prints the prediction's seconds
and voxels/s.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="bundle directory (WORKDIR/model)")
  parser.add_argument("--scan", required=True, help="scan directory to predict")
  parser.add_argument("--out", default="docs/napari_predict.png")
  parser.add_argument("--size", default="1500,900", help="window width,height")
  args = parser.parse_args()
  os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

  import napari
  from qtpy.QtWidgets import QApplication

  from bonejax.napari import reader
  from bonejax.napari.predict_widget import PredictWidget

  viewer = napari.Viewer(title="bonejax in napari")
  for data in reader.get_reader(args.scan)(args.scan):
    viewer._add_layer_from_data(*data)
  name = Path(args.scan).name
  viewer.layers[f"{name} labels"].visible = False
  w = PredictWidget(viewer)
  viewer.window.add_dock_widget(w, name="Predict (bonejax)", area="right")
  w.model.setText(args.model)
  w.image.select(name)
  w.planes.setCurrentText("3")
  w.vote.setCurrentText("soft")
  w.start()
  while w.busy:
    QApplication.processEvents()
    time.sleep(0.05)
  if w.status.error:
    raise SystemExit(f"error: {w.status.error}")
  viewer.layers[f"{name} prediction"].opacity = 0.55
  viewer.dims.set_point(0, viewer.dims.range[0].stop / 2)
  width, height = (int(v) for v in args.size.split(","))
  viewer.window._qt_window.resize(width, height)
  viewer.reset_view()
  for _ in range(20):
    QApplication.processEvents()
    time.sleep(0.05)
  viewer.screenshot(args.out, canvas_only=False)
  print(f"{args.out}: {w.status.text()}")
  viewer.close()


if __name__ == "__main__":
  main()
