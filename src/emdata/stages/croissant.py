"""Croissant (MLCommons' JSON-LD for ML datasets) for each built dataset and for the repository.

A dataset's file names its HDF5 as a ``FileObject`` (with the file's sha256) and describes each
array role as a ``RecordSet`` whose records are inline: Croissant readers cannot decode HDF5, so
the records are the arrays' descriptions (path, shape, dtype, voxel size, offset, label classes),
which ``mlcroissant`` loads as they are. The repository's file has one record per dataset in
params.yaml (the catalog) and the HDF5 of each built one. No timestamps: same inputs, same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from emdata.stages.table import params_row
from emdata.params.config import Config, DatasetEntry
from emdata.params.layout import processed_relpath

# The HDF5 is data/processed/<key>.h5 (params.layout); contentUrl is relative to the Croissant file.
REPOSITORY_FILE = "data/croissant.json"  # git tracked, like data/metadata.csv
DATASET_DIR = "data/croissant"  # <dataset>.json per built dataset, git tracked like the thumbnails
HDF5_FORMAT = "application/x-hdf5"
CHECKSUM_NOTE = ("The sha256 given for the HDF5 is of the file's bytes; the md5 in dvc.lock is DVC's "
                 "identity of the same file.")

# The context mlcroissant writes for Croissant 1.0 (isArray and arrayShape are spelled cr:...).
CONTEXT: dict[str, Any] = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField",
    "path": "cr:path", "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
    "repeated": "cr:repeated", "replace": "cr:replace", "samplingRate": "cr:samplingRate",
    "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform",
}
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"

# (field name, Croissant data type, array length or None) of an array's record
ARRAY_FIELDS = [("hdf5_path", "sc:Text", None), ("shape", "sc:Integer", "-1"), ("dtype", "sc:Text", None),
                ("voxel_size_nm", "sc:Float", "-1"), ("offset_nm", "sc:Float", "-1"),
                ("label_classes", "sc:Text", "-1")]
CATALOG_FIELDS = [("dataset", "sc:Text", None), ("title", "sc:Text", None), ("source_kind", "sc:Text", None),
                  ("modality", "sc:Text", None), ("license", "sc:Text", None), ("doi", "sc:Text", None),
                  ("built", "sc:Boolean", None), ("shape_zyx", "sc:Integer", "-1"),
                  ("voxel_size_nm_zyx", "sc:Float", "-1"), ("hdf5", "sc:Text", None), ("sha256", "sc:Text", None)]


def document_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def _fields(record_set: str, spec: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    fields = []
    for name, data_type, shape in spec:
        field: dict[str, Any] = {"@type": "cr:Field", "@id": f"{record_set}/{name}", "name": name,
                                 "dataType": data_type}
        if shape is not None:
            field.update({"cr:isArray": True, "cr:arrayShape": shape})
        fields.append(field)
    return fields


def _record_set(name: str, description: str, spec: list[tuple[str, str, str | None]],
                rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A RecordSet whose records are given inline (``data``), keyed by field id."""
    return {"@type": "cr:RecordSet", "@id": name, "name": name, "description": description,
            "field": _fields(name, spec),
            "data": [{f"{name}/{field}": row.get(field) for field, _, _ in spec} for row in rows]}


def _file_object(ds: DatasetEntry, record: dict[str, Any], url: str) -> dict[str, Any]:
    """The HDF5; ``url`` is relative to the Croissant file that names it."""
    return {"@type": "cr:FileObject", "@id": f"{ds.key}.h5", "name": f"{ds.key}.h5",
            "contentUrl": url, "encodingFormat": HDF5_FORMAT,
            "contentSize": f"{record['bytes_on_disk']} B", "sha256": record["file_sha256"]}


def _label_classes(ds: DatasetEntry, name: str, info: dict[str, Any]) -> list[str]:
    """``value: class`` of a label array: params' value map if any, else ids up to the maximum."""
    stored = sorted(set(ds.label_values.get(name, {}).values()))
    if stored:
        return ["0: background", *(f"{v}: {name}" for v in stored)]
    top = int((info.get("statistics") or info).get("max") or 0)
    return ["0: background"] + ([f"1-{top}: {name} (one id per object)"] if top > 1 else [f"1: {name}"])


def _volume_arrays(ds: DatasetEntry, record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    geometry = {"voxel_size_nm": record["voxel_size_nm"], "offset_nm": record["offset_nm"]}
    roles = {"raw": [{"hdf5_path": "/raw", "shape": record["shape"], "dtype": record["dtype"], **geometry,
                      "label_classes": []}]}
    for name, info in sorted(record["labels"].items()):
        roles[f"labels/{name}"] = [{"hdf5_path": f"/labels/{name}", "shape": info.get("shape", record["shape"]),
                                    "dtype": info["dtype"], **geometry,
                                    "label_classes": _label_classes(ds, name, info)}]
    return roles


def _collection_arrays(ds: DatasetEntry, record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Arrays grouped by role (``inputs/BF``, ``targets/Actin``, ``labels/...``): one record per image's array."""
    roles: dict[str, list[dict[str, Any]]] = {role: [] for role in sorted(record["roles"])}
    for path, info in sorted(record["arrays"].items()):
        inner = path.split("/", 2)[2]  # images/<image>/<inner>
        role = next((r for r in roles if inner == r or inner.startswith(f"{r}_")), inner)
        label = role.split("/", 1)[1] if role.startswith("labels/") else None
        roles.setdefault(role, []).append({
            "hdf5_path": f"/{path}", "shape": info["shape"], "dtype": info["dtype"],
            "voxel_size_nm": info.get("resolution"), "offset_nm": None,
            "label_classes": _label_classes(ds, label, info) if label else []})
    return roles


def dataset_document(ds: DatasetEntry, record: dict[str, Any]) -> dict[str, Any]:
    """The Croissant of one built dataset (``record`` is its data/metadata/<key>.json)."""
    collection = record.get("layout") == "collection"
    roles = (_collection_arrays if collection else _volume_arrays)(ds, record)
    sets = [_record_set(role.replace("/", "_"),
                        f"{'Arrays' if collection else 'The array'} {role} of {ds.key}.h5: shape, dtype, voxel size "
                        "(nm, the array's axes), offset (nm) and label classes; read the voxels with h5py or "
                        "emdata.open_dataset.", ARRAY_FIELDS, rows)
            for role, rows in roles.items()]
    return {
        "@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO, "name": ds.key,
        "description": f"{ds.title}. {ds.modality}. {CHECKSUM_NOTE}", "license": ds.license,
        "citeAs": ds.citation, **_same_as(ds), "distribution": [_file_object(ds, record, f"../processed/{ds.key}.h5")], "recordSet": sets,
    }


def _same_as(ds: DatasetEntry) -> dict[str, Any]:
    return {"sameAs": f"https://doi.org/{ds.doi}"} if ds.doi else {}


def repository_document(cfg: Config, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Croissant of the repository: a ``datasets`` record per params.yaml entry, built or not."""
    rows, files = [], []
    for key in sorted(cfg.datasets):
        ds, record = cfg.datasets[key], records.get(key)
        row = params_row(ds)
        row.update(built=record is not None, hdf5=processed_relpath(key), sha256=None)
        if record is not None:
            files.append(_file_object(ds, record, f"processed/{key}.h5"))
            row["sha256"] = record["file_sha256"]
            if record.get("layout") != "collection":
                row.update(shape_zyx=record["shape"], voxel_size_nm_zyx=record["voxel_size_nm"])
        rows.append(row)
    catalog = _record_set("datasets", "One record per dataset in params.yaml: what params say before a build, "
                          "the built file's shape, voxel size and sha256 after. Each dataset's arrays are "
                          f"described in {DATASET_DIR}/<dataset>.json.", CATALOG_FIELDS, rows)
    licences = sorted({cfg.datasets[k].license for k in cfg.datasets})
    return {
        "@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CONFORMS_TO, "name": "emdata",
        "description": "Public 3D microscopy volumes as versioned, ML-ready HDF5 (one file per dataset, "
                       f"built by a DVC pipeline). Each dataset keeps its own licence and citation. {CHECKSUM_NOTE}",
        "license": licences, "citeAs": "Cite each dataset as its record says (params.yaml, citation).",
        "distribution": files, "recordSet": [catalog],
    }
