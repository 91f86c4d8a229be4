"""The DIMSE door with DCMTK's stock tools, as a PACS engineer tries a new node: echoscu,
storescu of a series (a folder, as sent from a workstation) and of compressed files sent as
they are, findscu at study and series level; a file the door refuses is reported with its
reason and reaches no index row. On the real pipeline, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pydicom
import pytest

from medimg_ingest.dimse import DimseServer
from medimg_ingest.pipeline import Pipeline
from services.ingest.tests.support import Recorded, dicom_file, series


async def dcmtk(
    tool: str, server: DimseServer, *options: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Runs one of DCMTK's SCUs against the door, as AE MODALITY."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is missing: scripts/setup.sh installs Debian's `dcmtk` package when run as "
            "root; else `apt-get install dcmtk`"
        )
    peer = ("127.0.0.1", str(server.port))
    command = [path, "-aet", "MODALITY", "-aec", "MEDIMG", *options, *peer, *map(str, files)]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def test_dcmtk_echoes_stores_a_series_and_finds_it(
    door: tuple[DimseServer, Pipeline, Recorded], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    server, _, recorded = door
    echo = await dcmtk("echoscu", server)
    assert echo.returncode == 0, echo.stderr

    sent = tmp_path / "series"
    sent.mkdir()
    instances = series(3)
    for n, dataset in enumerate(instances):
        dataset.save_as(sent / f"IM{n}.dcm", enforce_file_format=True)
    store = await dcmtk("storescu", server, "+sd", files=(sent,))
    assert store.returncode == 0, store.stderr
    assert await pool.fetchval("SELECT count(*) FROM instances") == 3
    pseudonym = recorded.accesses[0].patient_pseudonym

    queries = iter(range(100))

    async def find(level: str, *keys: str) -> list[pydicom.Dataset]:
        """findscu's answers, each written to a file of its own (-X) in a new folder."""
        out = tmp_path / f"found-{next(queries)}"
        out.mkdir()
        keys = ("QueryRetrieveLevel=" + level, *keys)
        found = await dcmtk("findscu", server, "-S", "-X", "-od", str(out), *(
            argument for key in keys for argument in ("-k", key)
        ))  # fmt: skip
        assert found.returncode == 0, found.stderr
        return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]

    [study] = await find(
        "STUDY", f"PatientID={pseudonym}", "StudyInstanceUID", "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
    )  # fmt: skip
    assert (study.PatientID, study.ModalitiesInStudy, study.NumberOfStudyRelatedInstances) == (
        pseudonym,
        "CT",
        3,
    )
    assert study.StudyInstanceUID != instances[0].StudyInstanceUID  # de-identified
    [found_series] = await find(
        "SERIES", f"StudyInstanceUID={study.StudyInstanceUID}", "SeriesInstanceUID", "Modality"
    )
    assert found_series.Modality == "CT"
    assert await find("STUDY", "PatientID=ANON-NOBODY", "StudyInstanceUID") == []


async def test_a_file_the_door_refuses_is_reported_by_storescu_and_not_indexed(
    door: tuple[DimseServer, Pipeline, Recorded], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    server, _, _ = door
    [dataset] = series(1)
    dataset.PixelData = dataset.PixelData[:100]  # cut short
    path = tmp_path / "cut.dcm"
    dataset.save_as(path, enforce_file_format=True)

    store = await dcmtk("storescu", server, "-d", files=(path,))

    # storescu's debug log shows the response: status C000 with the door's reason.
    assert "DIMSE Status                  : 0xc000" in store.stderr, store.stderr
    assert "(0000,0902) LO [INCONSISTENT_PIXEL_DATA]" in store.stderr, store.stderr
    assert await pool.fetchval("SELECT count(*) FROM instances") == 0


#: Compressed files of pydicom's corpus, and the storescu option that proposes their syntax.
COMPRESSED = {
    "MR_small_RLE.dcm": "-xr",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS Lossless
    "emri_small_jpeg_2k_lossless.dcm": "-xv",  # JPEG 2000 Lossless, Enhanced MR, multi-frame
}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
async def test_dcmtk_sends_a_compressed_file_as_it_is(
    door: tuple[DimseServer, Pipeline, Recorded], pool: asyncpg.Pool, tmp_path: Path, name: str
) -> None:
    """storescu proposes the file's own compressed syntax alone (-R): the door accepts it,
    decodes the pixels to validate them (pylibjpeg) and stores the instance."""
    server, _, _ = door
    path = tmp_path / name
    path.write_bytes(dicom_file(name))
    syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    assert syntax.is_compressed

    store = await dcmtk("storescu", server, "-R", COMPRESSED[name], "-v", files=(path,))

    assert store.returncode == 0, store.stderr
    assert "-> Little Endian" not in store.stderr, store.stderr  # sent as it is
    assert "Received Store Response (Success)" in store.stderr, store.stderr
    assert await pool.fetchval("SELECT count(*) FROM instances") == 1
