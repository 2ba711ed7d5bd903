"""The named datasets: their release files, where to fetch them, how they are checked, and the
statistics LlamaRec reports for them.

A checksum is pinned only where it comes from a source that can be checked: the ml-latest-small
CSVs were hashed from the official 2018-09-26 release; the ml-100k and ml-1m archive hashes are the
ones TensorFlow Datasets pins (``tensorflow_datasets/url_checksums/movielens.txt``, with the sizes
GroupLens serves), which other projects pin independently too. The Amazon 2014/2018 files have no
published checksum: they are **not pinned**. Their SHA-256 is recorded in ``meta.json`` so that two
runs can still be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RemoteFile:
    """A file as published: its name, where it lives, and its SHA-256 when pinned."""

    name: str
    url: str
    sha256: str | None = None  # None: not pinned
    size: int | None = None  # bytes, when known; shown before the download starts


@dataclass(frozen=True)
class NamedDataset:
    name: str
    reader: str  # which parser in formats.py reads the members
    members: tuple[str, ...]  # the files the reader parses, in the reader's argument order
    downloads: tuple[RemoteFile, ...]  # what source=download fetches
    archive_folder: str | None = None  # the members sit in this folder of the (single) zip download
    member_sha256: dict[str, str] = field(default_factory=dict)  # pinned hashes of the members themselves
    # Alternative names a member may have in a local directory (an uncompressed metadata file).
    local_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    llamarec: dict[str, Any] | None = None  # LlamaRec's Table 2 row for this dataset
    citation: str = ""


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
SNAP_2014 = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
# LlamaRec's Games metadata: the 2018 release, as the 2014 file lacks many titles (its datasets/games.py).
UCSD_2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/metaFiles2"

_MOVIELENS = ("F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
              "ACM TiiS 5, 4, Article 19.")
_AMAZON_2014 = ("R. He and J. McAuley. 2016. Ups and Downs: Modeling the Visual Evolution of Fashion Trends with "
                "One-Class Collaborative Filtering. WWW; J. McAuley et al. 2015. Image-based Recommendations "
                "on Styles and Substitutes. SIGIR.")
_AMAZON_2018 = ("J. Ni, J. Li and J. McAuley. 2019. Justifying Recommendations using Distantly-Labeled Reviews "
                "and Fine-Grained Aspects. EMNLP.")

CATALOG: dict[str, NamedDataset] = {
    "ml-latest-small": NamedDataset(
        name="ml-latest-small",
        reader="movielens_csv",
        members=("ratings.csv", "movies.csv"),
        downloads=(RemoteFile("ml-latest-small.zip", f"{GROUPLENS}/ml-latest-small.zip"),),
        archive_folder="ml-latest-small",
        # The official release generated on 2018-09-26 (610 users, 9,742 movies). The archive itself is
        # not pinned: the bundled copy is a repack, and the CSVs are what is parsed.
        member_sha256={
            "ratings.csv": "0b0e333bbf3c6c161e3119c2d28673fbb0e804c0344e33724fb1f4ca1d1d694a",
            "movies.csv": "2cae9e54231a88049d21a84e9192d11130dcebdbcb532f4f95c2e2f81ee50862",
        },
        # LlamaRec calls it "ML-100k"; 610 x 147.99 = 90,274 interactions.
        llamarec={"users": 610, "items": 3650, "interactions": 90274, "mean_length": 147.99},
        citation=_MOVIELENS,
    ),
    "ml-100k": NamedDataset(
        name="ml-100k",
        reader="ml100k",
        members=("u.data", "u.item"),
        downloads=(RemoteFile("ml-100k.zip", f"{GROUPLENS}/ml-100k.zip",
                              sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
                              size=4_924_029),),
        archive_folder="ml-100k",
        citation=_MOVIELENS,
    ),
    "ml-1m": NamedDataset(
        name="ml-1m",
        reader="ml1m",
        members=("ratings.dat", "movies.dat"),
        downloads=(RemoteFile("ml-1m.zip", f"{GROUPLENS}/ml-1m.zip",
                              sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                              size=5_917_549),),
        archive_folder="ml-1m",
        citation=_MOVIELENS,
    ),
    "beauty": NamedDataset(
        name="beauty",
        reader="amazon",
        members=("ratings_Beauty.csv", "meta_Beauty.json.gz"),
        downloads=(RemoteFile("ratings_Beauty.csv", f"{SNAP_2014}/ratings_Beauty.csv"),
                   RemoteFile("meta_Beauty.json.gz", f"{SNAP_2014}/meta_Beauty.json.gz")),
        local_aliases={"meta_Beauty.json.gz": ("meta_Beauty.json",)},
        # Rounded in the paper: 198K interactions.
        llamarec={"users": 22332, "items": 12086, "interactions": 198_000, "mean_length": 8.87,
                  "interactions_rounded": True},
        citation=_AMAZON_2014,
    ),
    "games": NamedDataset(
        name="games",
        reader="amazon",
        members=("ratings_Video_Games.csv", "meta_Video_Games.json.gz"),
        downloads=(RemoteFile("ratings_Video_Games.csv", f"{SNAP_2014}/ratings_Video_Games.csv"),
                   RemoteFile("meta_Video_Games.json.gz", f"{UCSD_2018}/meta_Video_Games.json.gz")),
        local_aliases={"meta_Video_Games.json.gz": ("meta_Video_Games.json",)},
        llamarec={"users": 15264, "items": 7676, "interactions": 148_000, "mean_length": 9.69,
                  "interactions_rounded": True},
        citation=f"{_AMAZON_2014} Metadata: {_AMAZON_2018}",
    ),
}
