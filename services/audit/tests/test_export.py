"""Audit exports: DICOM messages valid against PS3.15's schema, FHIR R4 AuditEvents and Bundles."""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import rnc2rng  # type: ignore[import-untyped]
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle as FhirBundle
from google.protobuf import timestamp_pb2
from lxml import etree  # type: ignore[import-untyped]

from medimg.audit.v1 import audit_service_pb2 as pb
from medimg_audit import export

SCHEMA = Path(__file__).parent / "schemas" / "dicom-audit-message.rnc"
GATEWAY = "spiffe://medimg.local/ns/medimg/sa/gateway"
INFERENCE = "spiffe://medimg.local/ns/medimg/sa/inference"
STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
INSTANCE = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
INSTANCE_NAME = f"studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ACTIONS = [a for a in pb.Action.values() if a != pb.ACTION_UNSPECIFIED]
OUTCOMES = [o for o in pb.Outcome.values() if o != pb.OUTCOME_UNSPECIFIED]
EVERY_ACTION_AND_OUTCOME = [
    pytest.param(action, outcome, id=f"{pb.Action.Name(action)}-{pb.Outcome.Name(outcome)}")
    for action, outcome in itertools.product(ACTIONS, OUTCOMES)
]
RESOURCES = [
    f"studies/{STUDY}",
    f"studies/{STUDY}/series/{SERIES}",
    INSTANCE_NAME,
    "studies",
    "auditEvents",
    "checkpoints/42",
    "models/chest-ct-nodules",
    "trainingJobs/7",
    "",
    "datasets/lung/labels/x",
]

# The R4 value sets (http://hl7.org/fhir/R4/auditevent.html) that fhir.resources does not check.
R4_CODES = {
    "http://terminology.hl7.org/CodeSystem/audit-entity-type": {"1", "2", "3", "4"},
    "http://terminology.hl7.org/CodeSystem/object-role": {str(n) for n in range(1, 25)},
    "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle": {str(n) for n in range(1, 16)},
    "http://terminology.hl7.org/CodeSystem/security-source-type": {str(n) for n in range(1, 10)},
    "http://hl7.org/fhir/resource-types": {"Patient"},
}


def event(**fields: Any) -> pb.AuditEvent:
    values: dict[str, Any] = {
        "event_id": "6f1c1d8e-3b0a-4c39-9a55-0c5b1e2f7a10",
        "event_time": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_000_000),
        "actor": pb.Actor(workload=GATEWAY, user="dr-okafor", roles=["clinician", "admin"]),
        "action": pb.ACTION_READ,
        "outcome": pb.OUTCOME_SUCCESS,
        "resource": INSTANCE_NAME,
        "patient_pseudonym": "PSN-7f3a9c",
        "service": "ingest",
        "method": "/medimg.ingest.v1.IngestService/GetInstance",
        "trace_id": TRACE,
    }
    values.update(fields)
    return pb.AuditEvent(**values)


@pytest.fixture(scope="module")
def schema() -> Any:
    # The standard writes each value's documentation as a trailing `##` comment, which strict
    # RELAX NG Compact grammar allows only before a pattern; as plain comments they mean the same.
    compact = SCHEMA.read_text(encoding="utf-8").replace("##", "#")
    return etree.RelaxNG(etree.fromstring(rnc2rng.dumps(rnc2rng.loads(compact)).encode()))


def valid(schema: Any, message: bytes) -> ElementTree.Element:
    """Asserts the message is one line, valid against the schema; returns it parsed."""
    assert b"\n" not in message and b"\r" not in message
    assert message.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert schema.validate(etree.fromstring(message)), schema.error_log
    return ElementTree.fromstring(message)


def code(element: ElementTree.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return (
        element.get("csd-code", ""),
        element.get("codeSystemName", ""),
        element.get("originalText", ""),
    )


def details(obj: ElementTree.Element) -> dict[str, str]:
    return {
        d.get("type", ""): base64.b64decode(d.get("value", "")).decode()
        for d in obj.iter("ParticipantObjectDetail")
    }


def fhir_valid(resource: dict[str, Any]) -> FhirAuditEvent:
    """Asserts the resource is a valid R4 AuditEvent, codes included; returns the model."""
    model = FhirAuditEvent.model_validate(resource)
    assert resource["action"] in {"C", "R", "U", "D", "E"}
    assert resource["outcome"] in {"0", "4", "8", "12"}
    assert resource["agent"] and all(agent["requestor"] is True for agent in resource["agent"])
    codings = [
        e[k] for e in resource.get("entity", []) for k in ("type", "role", "lifecycle") if k in e
    ]
    codings += resource["source"]["type"]
    for coding in codings:
        if coding["system"] in R4_CODES:
            assert coding["code"] in R4_CODES[coding["system"]], coding
    assert json.loads(json.dumps(resource)) == resource  # plain JSON types only
    return model


# --- the DICOM message ----------------------------------------------------------------------


@pytest.mark.parametrize(("action", "outcome"), EVERY_ACTION_AND_OUTCOME)
def test_every_action_and_outcome_on_every_kind_of_resource_is_valid(
    schema: Any, action: int, outcome: int
) -> None:
    for resource in RESOURCES:
        message = export.dicom_audit_message(
            event(action=action, outcome=outcome, resource=resource)
        )
        root = valid(schema, message)
        identification = root.find("EventIdentification")
        assert identification is not None
        indicators: dict[int, str] = {pb.OUTCOME_SUCCESS: "0", pb.OUTCOME_FAILURE: "8"}
        indicator = indicators.get(outcome, "4")
        assert identification.get("EventOutcomeIndicator") == indicator
        assert (identification.find("EventOutcomeDescription") is None) == (
            outcome == pb.OUTCOME_SUCCESS
        )


def test_an_instance_read_has_the_structure_and_codes_of_a5_3_6(schema: Any) -> None:
    root = valid(schema, export.dicom_audit_message(event()))
    identification = root.find("EventIdentification")
    assert identification is not None
    assert identification.attrib == {
        "EventActionCode": "R",
        "EventDateTime": "2023-11-14T22:13:20.123Z",
        "EventOutcomeIndicator": "0",
    }
    assert code(identification.find("EventID")) == ("110103", "DCM", "DICOM Instances Accessed")
    assert [code(c) for c in identification.iter("EventTypeCode")] == [
        ("/medimg.ingest.v1.IngestService/GetInstance", "99MEDIMG", "IngestService/GetInstance")
    ]
    workload, user = root.findall("ActiveParticipant")
    assert workload.attrib == {"UserID": GATEWAY, "UserIsRequestor": "true"}
    assert [code(c) for c in workload.iter("RoleIDCode")] == [("110150", "DCM", "Application")]
    assert user.attrib == {"UserID": "dr-okafor", "UserIsRequestor": "true"}
    assert [code(c) for c in user.iter("RoleIDCode")] == [
        ("clinician", "99MEDIMG", "clinician"),
        ("admin", "99MEDIMG", "admin"),
    ]
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "ingest"
    assert [c.get("csd-code") for c in source.iter("AuditSourceTypeCode")] == ["4"]
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.attrib == {
        "ParticipantObjectID": STUDY,
        "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3",
        "ParticipantObjectDataLifeCycle": "6",
    }
    assert code(study.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    assert study.findtext("ParticipantObjectName") == INSTANCE_NAME
    assert details(study) == {
        "SeriesInstanceUID": SERIES,
        "SOPInstanceUID": INSTANCE,
        "medimg-event-id": "6f1c1d8e-3b0a-4c39-9a55-0c5b1e2f7a10",
        "trace-id": TRACE,
    }
    assert patient.attrib == {
        "ParticipantObjectID": "PSN-7f3a9c",
        "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1",
    }
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == "PSN-7f3a9c"  # the pseudonym, no PHI
    assert details(patient) == {}


@pytest.mark.parametrize(
    "case",
    [
        (pb.ACTION_READ, pb.OUTCOME_UNAUTHENTICATED, f"studies/{STUDY}", "110114", "E"),
        (pb.ACTION_EXPORT, pb.OUTCOME_UNAUTHENTICATED, "auditEvents", "110114", "E"),
        (pb.ACTION_EXPORT, pb.OUTCOME_SUCCESS, f"studies/{STUDY}", "110106", "R"),
        (pb.ACTION_EXPORT, pb.OUTCOME_SUCCESS, "auditEvents", "110106", "R"),
        (pb.ACTION_EXPORT, pb.OUTCOME_PERMISSION_DENIED, "models/m1", "110106", "R"),
        (pb.ACTION_READ, pb.OUTCOME_SUCCESS, "auditEvents", "110101", "R"),
        (pb.ACTION_READ, pb.OUTCOME_SUCCESS, "auditEvents/41", "110101", "R"),
        (pb.ACTION_CREATE, pb.OUTCOME_SUCCESS, "checkpoints/1024", "110101", "C"),
        (pb.ACTION_READ, pb.OUTCOME_SUCCESS, "studies", "110112", "E"),
        (pb.ACTION_READ, pb.OUTCOME_PERMISSION_DENIED, "trainingJobs", "110112", "E"),
        (pb.ACTION_CREATE, pb.OUTCOME_SUCCESS, INSTANCE_NAME, "110104", "C"),
        (pb.ACTION_CREATE, pb.OUTCOME_FAILURE, f"studies/{STUDY}", "110104", "C"),
        (pb.ACTION_DELETE, pb.OUTCOME_SUCCESS, f"studies/{STUDY}", "110105", "D"),
        (pb.ACTION_DELETE, pb.OUTCOME_SUCCESS, INSTANCE_NAME, "110103", "D"),
        (pb.ACTION_READ, pb.OUTCOME_PERMISSION_DENIED, f"studies/{STUDY}", "110103", "R"),
        (pb.ACTION_UPDATE, pb.OUTCOME_SUCCESS, f"studies/{STUDY}/series/{SERIES}", "110103", "U"),
        (pb.ACTION_EXECUTE, pb.OUTCOME_SUCCESS, f"studies/{STUDY}/series/{SERIES}", "110103", "R"),
        (pb.ACTION_EXECUTE, pb.OUTCOME_SUCCESS, "models/chest-ct-nodules", "110100", "E"),
        (pb.ACTION_CREATE, pb.OUTCOME_SUCCESS, "trainingJobs/7", "110100", "C"),
        (pb.ACTION_UPDATE, pb.OUTCOME_SUCCESS, "models/m1", "110100", "U"),
        (pb.ACTION_DELETE, pb.OUTCOME_SUCCESS, "models/m1", "110100", "D"),
        (pb.ACTION_READ, pb.OUTCOME_SUCCESS, "", "110100", "R"),
    ],
)
def test_event_ids_and_action_codes_follow_the_mapping_table(
    schema: Any, case: tuple[int, int, str, str, str]
) -> None:
    action, outcome, resource, event_id, action_code = case
    message = export.dicom_audit_message(event(action=action, outcome=outcome, resource=resource))
    identification = valid(schema, message).find("EventIdentification")
    assert identification is not None
    assert code(identification.find("EventID"))[:2] == (event_id, "DCM")
    assert identification.get("EventActionCode") == action_code
    resource_fhir = export.fhir_audit_event(
        event(action=action, outcome=outcome, resource=resource)
    )
    assert resource_fhir["type"]["code"] == event_id
    assert resource_fhir["action"] == action_code


def test_a_failed_login_is_user_authentication_with_login_type(schema: Any) -> None:
    message = export.dicom_audit_message(
        event(outcome=pb.OUTCOME_UNAUTHENTICATED, actor=pb.Actor(workload=GATEWAY))
    )
    identification = valid(schema, message).find("EventIdentification")
    assert identification is not None
    assert [code(c)[0] for c in identification.iter("EventTypeCode")] == [
        "/medimg.ingest.v1.IngestService/GetInstance",
        "110122",
    ]
    assert identification.findtext("EventOutcomeDescription") == (
        "The caller could not be authenticated."
    )


@pytest.mark.parametrize(
    "case",
    [
        ("auditEvents", "auditEvents", "12", "13", "Security Audit Log"),
        ("studies", "studies", "12", "24", "studies"),
        ("trainingJobs/7", "trainingJobs/7", "12", "20", "trainingJobs/7"),
        (
            "models/chest-ct-nodules",
            "models/chest-ct-nodules",
            "12",
            None,
            "models/chest-ct-nodules",
        ),
        (f"studies/{STUDY}", STUDY, "110180", "3", f"studies/{STUDY}"),
    ],
)
def test_resources_become_typed_participant_objects(
    schema: Any, case: tuple[str, str, str, str | None, str]
) -> None:
    resource, object_id, id_type, role, name = case
    root = valid(schema, export.dicom_audit_message(event(resource=resource)))
    first = root.findall("ParticipantObjectIdentification")[0]
    assert first.get("ParticipantObjectID") == object_id
    assert code(first.find("ParticipantObjectIDTypeCode"))[0] == id_type
    assert first.get("ParticipantObjectTypeCodeRole") == role
    assert first.findtext("ParticipantObjectName") == name


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"'),
        (b'EventActionCode="R"', b'EventActionCode="X"'),
        (b'EventDateTime="2023-11-14T22:13:20.123Z"', b'EventDateTime="yesterday"'),
        (b'UserIsRequestor="true"', b'UserIsRequestor="yes"'),
        (b"<ParticipantObjectName>PSN-7f3a9c</ParticipantObjectName>", b""),
        (b'ParticipantObjectTypeCodeRole="1"', b'ParticipantObjectTypeCodeRole="27"'),
        (b' originalText="Application"', b""),
        (b'SeriesInstanceUID" value="', b'SeriesInstanceUID" value="abc'),  # not base64
    ],
)
def test_the_schema_catches_what_it_should(schema: Any, old: bytes, new: bytes) -> None:
    message = export.dicom_audit_message(event())
    assert old in message
    assert not schema.validate(etree.fromstring(message.replace(old, new, 1)))


def test_without_user_only_the_workload_participates(schema: Any) -> None:
    root = valid(schema, export.dicom_audit_message(event(actor=pb.Actor(workload=INFERENCE))))
    (workload,) = root.findall("ActiveParticipant")
    assert workload.get("UserID") == INFERENCE
    resource = export.fhir_audit_event(event(actor=pb.Actor(workload=INFERENCE)))
    fhir_valid(resource)
    assert [a["who"]["identifier"]["value"] for a in resource["agent"]] == [INFERENCE]


def test_without_pseudonym_there_is_no_patient(schema: Any) -> None:
    root = valid(schema, export.dicom_audit_message(event(patient_pseudonym="")))
    objects = root.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectTypeCode") for o in objects] == ["2"]
    resource = export.fhir_audit_event(event(patient_pseudonym=""))
    fhir_valid(resource)
    assert all(e["type"]["code"] != "Patient" for e in resource["entity"])


def test_without_resource_the_details_go_on_the_method_or_the_event(schema: Any) -> None:
    root = valid(schema, export.dicom_audit_message(event(resource="")))
    first = root.findall("ParticipantObjectIdentification")[0]
    assert first.get("ParticipantObjectID") == "/medimg.ingest.v1.IngestService/GetInstance"
    assert details(first)["trace-id"] == TRACE
    bare = event(resource="", method="", trace_id="", patient_pseudonym="")
    (only,) = valid(schema, export.dicom_audit_message(bare)).findall(
        "ParticipantObjectIdentification"
    )
    assert only.get("ParticipantObjectID") == "urn:uuid:6f1c1d8e-3b0a-4c39-9a55-0c5b1e2f7a10"
    assert details(only) == {"medimg-event-id": "6f1c1d8e-3b0a-4c39-9a55-0c5b1e2f7a10"}
    resource = export.fhir_audit_event(bare)
    fhir_valid(resource)
    assert "entity" not in resource and "subtype" not in resource


def test_lifecycle_only_on_success(schema: Any) -> None:
    for outcome, lifecycle in ((pb.OUTCOME_SUCCESS, "14"), (pb.OUTCOME_PERMISSION_DENIED, None)):
        message = export.dicom_audit_message(event(action=pb.ACTION_DELETE, outcome=outcome))
        first = valid(schema, message).findall("ParticipantObjectIdentification")[0]
        assert first.get("ParticipantObjectDataLifeCycle") == lifecycle


def test_break_glass_is_an_emergency_override_with_its_reason(schema: Any) -> None:
    reason = 'Trauma bay 2: unconscious patient, <no consent> & "no PACS access"'
    root = valid(schema, export.dicom_audit_message(event(break_glass_reason=reason)))
    identification = root.find("EventIdentification")
    assert identification is not None
    type_codes = [code(c) for c in identification.iter("EventTypeCode")]
    assert ("110127", "DCM", "Emergency Override Started") in type_codes
    assert (
        details(root.findall("ParticipantObjectIdentification")[0])["break-glass-reason"] == reason
    )
    resource = export.fhir_audit_event(event(break_glass_reason=reason))
    fhir_valid(resource)
    assert resource["purposeOfEvent"] == [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "BTG",
                    "display": "break the glass",
                }
            ],
            "text": reason,
        }
    ]
    assert {
        "system": export.FHIR_DCM,
        "code": "110127",
        "display": "Emergency Override Started",
    } in (resource["subtype"])
    assert "purposeOfEvent" not in export.fhir_audit_event(event())


def test_unicode_names_round_trip_exactly(schema: Any) -> None:
    user = "Dr. José Núñez-Øberg 医生 🩻"
    roles = ["clínico", "研究者"]
    pseudonym = "PSN-Ωmega-ß"
    unicode_event = event(
        actor=pb.Actor(workload=GATEWAY, user=user, roles=roles),
        patient_pseudonym=pseudonym,
        break_glass_reason="Notfall \u2013 Schockraum",
    )
    message = export.dicom_audit_message(unicode_event)
    message.decode("utf-8")
    root = valid(schema, message)
    assert root.findall("ActiveParticipant")[1].get("UserID") == user
    assert [code(c)[0] for c in root.findall("ActiveParticipant")[1].iter("RoleIDCode")] == roles
    assert root.findall("ParticipantObjectIdentification")[1].findtext("ParticipantObjectName") == (
        pseudonym
    )
    resource = export.fhir_audit_event(unicode_event)
    fhir_valid(resource)
    assert resource["agent"][1]["who"]["identifier"]["value"] == user
    assert [r["text"] for r in resource["agent"][1]["role"]] == roles


def test_line_breaks_and_control_characters_never_break_a_line_or_the_xml(schema: Any) -> None:
    odd = event(
        actor=pb.Actor(workload=GATEWAY, user="line\nbreak\r\nuser\x00\x1b", roles=[" a\t b "]),
        patient_pseudonym="PSN\n1",
    )
    root = valid(schema, export.dicom_audit_message(odd))
    assert [code(c)[0] for c in root.findall("ActiveParticipant")[1].iter("RoleIDCode")] == ["a b"]
    resource = export.fhir_audit_event(odd)
    fhir_valid(resource)
    assert resource["agent"][1]["who"]["identifier"]["value"] == "line\nbreak\r\nuser\x00\x1b"
    assert root.findall("ActiveParticipant")[1].get("UserID") == "line\nbreak\r\nuser\ufffd\ufffd"
    pseudonym = root.findall("ParticipantObjectIdentification")[1]
    assert pseudonym.findtext("ParticipantObjectName") == "PSN\n1"


@pytest.mark.parametrize(
    "broken",
    [
        {"event_id": ""},
        {"event_time": None},
        {"actor": pb.Actor(user="dr-okafor")},
        {"service": ""},
        {"action": pb.ACTION_UNSPECIFIED},
        {"action": 99},
        {"outcome": pb.OUTCOME_UNSPECIFIED},
    ],
    ids=[
        "no-event-id",
        "no-event-time",
        "no-workload",
        "no-service",
        "unspecified-action",
        "unknown-action",
        "unspecified-outcome",
    ],
)
def test_an_incomplete_event_is_refused_not_guessed(broken: dict[str, Any]) -> None:
    bad = event(**broken)
    with pytest.raises(ValueError, match="audit event"):
        export.dicom_audit_message(bad)
    with pytest.raises(ValueError, match="audit event"):
        export.fhir_audit_event(bad)


def test_exports_are_deterministic() -> None:
    first = event(break_glass_reason="ER")
    second = pb.AuditEvent()
    second.CopyFrom(first)
    assert export.dicom_audit_message(first) == export.dicom_audit_message(second)
    assert b"".join(export.fhir_bundle_chunks([first, second], 1)) == b"".join(
        export.fhir_bundle_chunks([second, first], 7)
    )
    assert b"".join(export.dicom_xml_chunks([first] * 3, 2)) == b"".join(
        export.dicom_xml_chunks([second] * 3, 1)
    )


def test_nanosecond_times_are_kept() -> None:
    precise = event(event_time=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789))
    assert export.fhir_audit_event(precise)["recorded"] == "2023-11-14T22:13:20.123456789Z"
    fhir_valid(export.fhir_audit_event(precise))


# --- the FHIR resource and bundle -----------------------------------------------------------


@pytest.mark.parametrize(("action", "outcome"), EVERY_ACTION_AND_OUTCOME)
def test_every_action_and_outcome_is_a_valid_r4_audit_event(action: int, outcome: int) -> None:
    for resource_name in RESOURCES:
        resource = export.fhir_audit_event(
            event(action=action, outcome=outcome, resource=resource_name, break_glass_reason="ER")
        )
        fhir_valid(resource)
        assert ("outcomeDesc" in resource) == (outcome != pb.OUTCOME_SUCCESS)


def test_the_fhir_resource_names_who_did_what_to_which_entity() -> None:
    resource = export.fhir_audit_event(event())
    model = fhir_valid(resource)
    assert model.id == "6f1c1d8e-3b0a-4c39-9a55-0c5b1e2f7a10"
    assert resource["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110103",
        "display": "DICOM Instances Accessed",
    }
    assert resource["subtype"] == [
        {
            "system": export.FHIR_METHOD,
            "code": "/medimg.ingest.v1.IngestService/GetInstance",
            "display": "IngestService/GetInstance",
        }
    ]
    assert (resource["action"], resource["outcome"]) == ("R", "0")
    assert resource["recorded"] == "2023-11-14T22:13:20.123Z"
    workload, user = resource["agent"]
    assert workload["who"] == {"identifier": {"system": "urn:ietf:rfc:3986", "value": GATEWAY}}
    assert workload["type"]["coding"][0]["code"] == "110150"
    assert user["who"] == {"identifier": {"value": "dr-okafor"}}
    assert [r["coding"][0]["code"] for r in user["role"]] == ["clinician", "admin"]
    assert resource["source"]["observer"] == {"display": "ingest"}
    target, patient, trace = resource["entity"]
    assert target["what"] == {"identifier": {"value": INSTANCE_NAME}}
    assert (target["type"]["code"], target["role"]["code"], target["lifecycle"]["code"]) == (
        "2",
        "3",
        "6",
    )
    assert patient["what"] == {"type": "Patient", "identifier": {"value": "PSN-7f3a9c"}}
    assert (patient["type"]["code"], patient["role"]["code"]) == ("Patient", "1")
    assert trace["what"] == {"identifier": {"value": TRACE}}
    assert trace["type"]["code"] == "XrequestId"


def test_transfers_and_exports_name_the_workload_source_or_destination() -> None:
    created = export.fhir_audit_event(event(action=pb.ACTION_CREATE))
    exported = export.fhir_audit_event(event(action=pb.ACTION_EXPORT))
    assert created["agent"][0]["type"]["coding"][0]["code"] == "110153"
    assert exported["agent"][0]["type"]["coding"][0]["code"] == "110152"
    assert exported["entity"][0]["lifecycle"]["code"] == "10"


def events(count: int) -> list[pb.AuditEvent]:
    return [
        event(
            event_id=str(uuid.UUID(int=n)),
            action=ACTIONS[n % len(ACTIONS)],
            outcome=OUTCOMES[n % len(OUTCOMES)],
            resource=RESOURCES[n % len(RESOURCES)],
        )
        for n in range(count)
    ]


@pytest.mark.parametrize(("count", "chunk_events"), [(0, 3), (1, 3), (5, 2), (6, 3), (7, 500)])
def test_bundle_chunks_join_to_one_valid_bundle(count: int, chunk_events: int) -> None:
    chunks = list(export.fhir_bundle_chunks(events(count), chunk_events))
    assert len(chunks) == -(-count // chunk_events) + 1  # the entries, then the close
    document = json.loads(b"".join(chunks))
    bundle = FhirBundle.model_validate(document)
    assert (document["resourceType"], document["type"]) == ("Bundle", "collection")
    entries = document.get("entry", [])
    assert len(entries) == count and len(bundle.entry or []) == count
    for entry, source in zip(entries, events(count), strict=True):
        assert entry["fullUrl"] == f"urn:uuid:{source.event_id}"
        fhir_valid(entry["resource"])
        assert entry["resource"] == export.fhir_audit_event(source)
    if count == 0:
        assert "entry" not in document  # FHIR JSON has no empty arrays
    for chunk in chunks:
        chunk.decode("utf-8")
        assert chunk.count(b'"fullUrl"') <= chunk_events


def test_bundle_streams_without_reading_ahead() -> None:
    pulled = 0

    def source() -> Iterator[pb.AuditEvent]:
        nonlocal pulled
        for item in events(10_000):
            pulled += 1
            yield item

    chunks = export.fhir_bundle_chunks(source(), 100)
    next(chunks)
    assert pulled == 100
    next(chunks)
    assert pulled == 200


def test_dicom_chunks_are_one_valid_document_per_line(schema: Any) -> None:
    sources = events(7)
    chunks = list(export.dicom_xml_chunks(sources, 3))
    assert len(chunks) == 3 and all(chunk.endswith(b"\n") for chunk in chunks)
    lines = b"".join(chunks).split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == 7
    for line, source in zip(lines, sources, strict=True):
        valid(schema, line)
        assert line == export.dicom_audit_message(source)
    assert list(export.dicom_xml_chunks([])) == []


@pytest.mark.parametrize("chunks", [export.fhir_bundle_chunks, export.dicom_xml_chunks])
def test_chunk_size_must_be_positive(chunks: Any) -> None:
    with pytest.raises(ValueError, match="chunk_events"):
        next(chunks([event()], 0))


def test_parse_resource() -> None:
    parsed = export.parse_resource(INSTANCE_NAME)
    assert (parsed.kind, parsed.study, parsed.series, parsed.instance) == (
        export.Kind.INSTANCE,
        STUDY,
        SERIES,
        INSTANCE,
    )
    assert export.parse_resource("studies/").kind == export.Kind.OTHER
    assert export.parse_resource("studies/1/frames/2").kind == export.Kind.OTHER
    assert export.parse_resource(f"studies/{STUDY}/series").kind == export.Kind.COLLECTION
    assert export.parse_resource("checkpoints/latest").kind == export.Kind.AUDIT_LOG
    assert export.parse_resource("models/m/versions/3").kind == export.Kind.MODEL
