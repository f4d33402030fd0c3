"""Embed the example proteins on a local cluster, then explore the result with xarray.

python examples/embed_and_explore.py            # random weights of ESM-2 8M: runs anywhere
python examples/embed_and_explore.py --real     # the real ESM-2 8M, from the torch hub cache
"""

import argparse
from pathlib import Path

import numpy as np

import virnuc_dask

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="use the trained weights")
    args = parser.parse_args()

    path = virnuc_dask.embed(
        HERE / "data" / "some_proteins.fasta",
        HERE / "some_proteins.h5",
        model="esm2_t6_8M_UR50D",
        random_weights=not args.real,
        layers=[3, 6],
        overwrite=True,
    )
    with virnuc_dask.open_embeddings(path) as ds:
        print(ds)
        last = ds.embedding.sel(layer=6)
        unit = last / np.sqrt((last**2).sum("feature"))
        similarity = unit.values @ unit.values.T
        np.fill_diagonal(similarity, -1)
        first = str(ds.sequence.values[0])
        nearest = str(ds.sequence.values[similarity[0].argmax()])
        print(f"nearest neighbour of {first}: {nearest} (cosine {similarity[0].max():.3f})")
        truncated = list(ds.sequence.values[ds.truncated.values])
        limit = int(ds.attrs["max_residues"])
        longest = int(ds.length.max())
        if truncated:
            print(f"longer than {limit:,} residues, only the first {limit:,} embedded:", truncated)
        else:
            print(f"none truncated: the longest has {longest:,} residues, within {limit:,}")


if __name__ == "__main__":
    main()
