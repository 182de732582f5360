"""bonejax in napari: a reader and three dock widgets (Predict, Train, Evaluate).

napari finds this package through the npe2 manifest `napari.yaml` beside this file, named by the
`napari.manifest` entry point in pyproject.toml; install with `pip install -e ".[napari]"`.
This package is the only place in bonejax that imports napari or Qt, and it imports them only
inside the modules napari loads on demand (so `import bonejax.napari` stays cheap and headless).

Modules, one job each:
  layers            bonejax volumes as napari layers: scale, class names and colours, metadata
  reader            drag-and-drop: scan, dataset, prediction (.zarr) and OME-Zarr directories
  ngff              OME-NGFF 0.4 / 0.5 images and label images (multiscale, voxel size, colours)
  jobs              the GUI's progress and cancel hook for predict_volume, one-line messages
  qt                Qt glue shared by the widgets: forms, notifications, worker threads
  predict_widget    Predict: a bundle (or a converted .pth) on an image layer
  train_process     launch/train.py as a child process: command line, settings, curves, resume
  train_widget      Train: start / stop / resume a run, live loss and validation-IoU plot
  evaluate_widget   Evaluate: two labels layers -> IoU / Dice table, bone measures, report
"""
