"""Strips outputs, execution counts and papermill metadata from notebooks, as they are committed.

  python colab/strip_outputs.py [colab/*.ipynb]
"""
import glob
import os
import sys

import nbformat


def strip(path: str) -> None:
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    cell.metadata.pop("papermill", None)
    cell.metadata.pop("execution", None)
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  nb.metadata.pop("papermill", None)
  nbformat.write(nb, path)


if __name__ == "__main__":
  for p in sys.argv[1:] or sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.ipynb"))):
    strip(p)
    print("stripped", p)
