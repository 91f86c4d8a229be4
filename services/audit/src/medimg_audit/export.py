"""Audit events as DICOM PS3.15 A.5 audit messages (XML) and FHIR R4 AuditEvents (JSON)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any
from xml.etree import ElementTree

from google.protobuf.timestamp_pb2 import Timestamp

from medimg.audit.v1 import audit_service_pb2 as pb

# Coding schemes. DICOM messages name a scheme by its designator, FHIR by a URI.
DCM = "DCM"
RFC_3881 = "RFC-3881"
# Codes medimg defines itself (its roles and gRPC methods). "99" starts a private coding scheme
# designator in DICOM (PS3.16 section 8.2), so no registered scheme can collide with it.
LOCAL = "99MEDIMG"
FHIR_DCM = "http://dicom.nema.org/resources/ontology/DCM"
FHIR_ROLE = "https://medimg.io/fhir/CodeSystem/role"
FHIR_METHOD = "https://medimg.io/fhir/CodeSystem/grpc-method"
FHIR_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
FHIR_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
FHIR_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
FHIR_LIFECYCLE = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
FHIR_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
FHIR_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
FHIR_BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
URI_SYSTEM = "urn:ietf:rfc:3986"

_XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
# Characters XML 1.0 cannot carry at all, not even as character references.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True)
class Code:
    """One coded value: its code, its meaning, and its scheme in both formats."""

    code: str
    meaning: str
    scheme: str = DCM
    system: str = FHIR_DCM


# DICOM PS3.16 CID 400 (Audit Event ID), CID 401 (Audit Event Type) and CID 402 (Audit Active
# Participant Role ID) codes, all in the DCM scheme.
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
EXPORT = Code("110106", "Export")
QUERY = Code("110112", "Query")
USER_AUTHENTICATION = Code("110114", "User Authentication")
LOGIN = Code("110122", "Login")
EMERGENCY_OVERRIDE = Code("110127", "Emergency Override Started")
APPLICATION = Code("110150", "Application")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
# DICOM PS3.16 CID 404 and the RFC 3881 Participant Object ID Type codes (PS3.15 A.5.1.2.4).
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
PATIENT_NUMBER = Code("2", "Patient Number", RFC_3881, "")
URI = Code("12", "URI", RFC_3881, "")

_ACTION_CODES = {
    pb.ACTION_CREATE: "C",
    pb.ACTION_READ: "R",
    pb.ACTION_UPDATE: "U",
    pb.ACTION_DELETE: "D",
    pb.ACTION_EXECUTE: "E",
    pb.ACTION_EXPORT: "R",
}
# The FHIR R4 definitions of the four outcomes: 4 "often equivalent to an HTTP 400 response",
# 8 "often equivalent to an HTTP 500 response", 12 "the action was made unavailable".
_OUTCOMES = {
    pb.OUTCOME_SUCCESS: ("0", ""),
    pb.OUTCOME_UNAUTHENTICATED: ("4", "The caller could not be authenticated."),
    pb.OUTCOME_PERMISSION_DENIED: ("4", "The caller was authenticated but not allowed."),
    pb.OUTCOME_FAILURE: ("8", "The action was allowed but failed."),
}
# ParticipantObjectDataLifeCycle (PS3.15 A.5.1.2.3) of the object an action succeeded on.
_LIFECYCLES = {
    pb.ACTION_CREATE: ("1", "Origination / Creation"),
    pb.ACTION_READ: ("6", "Access / Use"),
    pb.ACTION_UPDATE: ("3", "Amendment"),
    pb.ACTION_DELETE: ("14", "Logical deletion"),
    pb.ACTION_EXECUTE: ("6", "Access / Use"),
    pb.ACTION_EXPORT: ("10", "Export"),
}
_OBJECT_ROLES = {
    "1": "Patient",
    "3": "Report",
    "13": "Security Resource",
    "20": "Job",
    "24": "Query",
}
_ENTITY_TYPES = {"1": "Person", "2": "System Object"}


class Kind(Enum):
    """What a resource name names."""

    NONE = "none"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"
    COLLECTION = "collection"
    AUDIT_LOG = "audit log"
    MODEL = "model"
    TRAINING_JOB = "training job"
    OTHER = "other"


_IMAGING = (Kind.STUDY, Kind.SERIES, Kind.INSTANCE)


@dataclass(frozen=True)
class Resource:
    """A parsed resource name: its kind and, for imaging resources, its DICOM UIDs."""

    name: str
    kind: Kind
    study: str = ""
    series: str = ""
    instance: str = ""


def parse_resource(name: str) -> Resource:
    """Parses a medimg resource name (AIP-122) into its kind and DICOM UIDs."""
    if not name:
        return Resource(name, Kind.NONE)
    parts = name.split("/")
    if "" in parts:
        return Resource(name, Kind.OTHER)
    if parts[0] in ("auditEvents", "checkpoints"):
        return Resource(name, Kind.AUDIT_LOG)
    if len(parts) % 2:
        return Resource(name, Kind.COLLECTION)
    if parts[0] == "studies":
        collections = parts[2::2]
        if not collections:
            return Resource(name, Kind.STUDY, study=parts[1])
        if collections == ["series"]:
            return Resource(name, Kind.SERIES, study=parts[1], series=parts[3])
        if collections == ["series", "instances"]:
            return Resource(name, Kind.INSTANCE, parts[1], parts[3], parts[5])
        return Resource(name, Kind.OTHER)
    return Resource(
        name, {"models": Kind.MODEL, "trainingJobs": Kind.TRAINING_JOB}.get(parts[0], Kind.OTHER)
    )


@dataclass(frozen=True)
class Classified:
    """How one event maps onto the DICOM and FHIR vocabularies (shared by both exports)."""

    event_id: Code
    action: str
    outcome: str
    outcome_description: str
    type_codes: tuple[Code, ...]
    workload_role: Code
    resource: Resource


def classify(event: pb.AuditEvent) -> Classified:
    """Maps an event onto audit codes; see `dicom_audit_message` for the table and its reasons."""
    _check(event)
    resource = parse_resource(event.resource)
    family, action = _family(event, resource)
    outcome, description = _OUTCOMES[event.outcome]
    types: list[Code] = []
    if event.method.strip():
        method = _token(event.method)
        types.append(Code(method, _method_meaning(method), LOCAL, FHIR_METHOD))
    if family == USER_AUTHENTICATION:
        types.append(LOGIN)
    if event.break_glass_reason:
        types.append(EMERGENCY_OVERRIDE)
    role = {INSTANCES_TRANSFERRED: SOURCE, EXPORT: DESTINATION}.get(family, APPLICATION)
    return Classified(family, action, outcome, description, tuple(types), role, resource)


def _check(event: pb.AuditEvent) -> None:
    # The log refuses such events on append; only a hand-built event can get here, and an
    # export must not fill a gap with a guess.
    missing = [
        field
        for field, present in (
            ("event_id", bool(event.event_id)),
            ("event_time", event.HasField("event_time")),
            ("actor.workload", bool(event.actor.workload)),
            ("service", bool(event.service)),
        )
        if not present
    ]
    if missing:
        raise ValueError(f"audit event {event.event_id!r} lacks {', '.join(missing)}")
    if event.action not in _ACTION_CODES:
        raise ValueError(f"audit event {event.event_id!r} has no known action")
    if event.outcome not in _OUTCOMES:
        raise ValueError(f"audit event {event.event_id!r} has no known outcome")


def _family(event: pb.AuditEvent, resource: Resource) -> tuple[Code, str]:
    action = event.action
    if event.outcome == pb.OUTCOME_UNAUTHENTICATED:
        return USER_AUTHENTICATION, "E"  # A.5.3.12: EventActionCode shall be E
    if action == pb.ACTION_EXPORT:
        return EXPORT, "R"  # A.5.3.4: shall be R (the data was read out of the system)
    if resource.kind == Kind.AUDIT_LOG:
        return AUDIT_LOG_USED, _ACTION_CODES[action]
    if resource.kind == Kind.COLLECTION and action == pb.ACTION_READ:
        return QUERY, "E"  # A.5.3.10: shall be E
    if resource.kind in _IMAGING:
        if action == pb.ACTION_CREATE:
            return INSTANCES_TRANSFERRED, "C"
        if action == pb.ACTION_DELETE and resource.kind == Kind.STUDY:
            return STUDY_DELETED, "D"
        # A.5.3.6 allows only C/R/U/D: a computation on instances reads them.
        return INSTANCES_ACCESSED, "R" if action == pb.ACTION_EXECUTE else _ACTION_CODES[action]
    return APPLICATION_ACTIVITY, _ACTION_CODES[action]


def _method_meaning(method: str) -> str:
    # "/medimg.ingest.v1.IngestService/GetStudy" means "IngestService/GetStudy".
    return method.lstrip("/").rsplit(".", 1)[-1] or method


def _time(stamp: Timestamp) -> str:
    # RFC 3339 in UTC with 0, 3, 6 or 9 fraction digits: an xsd:dateTime and a FHIR instant.
    return stamp.ToJsonString()


def _urn(event_id: str) -> str | None:
    try:
        return f"urn:uuid:{uuid.UUID(event_id)}"
    except ValueError:
        return None


def _lifecycle(event: pb.AuditEvent) -> tuple[str, str] | None:
    # The stage the data reached; a refused or failed action reached none.
    return _LIFECYCLES[event.action] if event.outcome == pb.OUTCOME_SUCCESS else None


# --- DICOM ----------------------------------------------------------------------------------


def dicom_audit_message(event: pb.AuditEvent) -> bytes:
    """One DICOM PS3.15 Annex A.5 audit message: a UTF-8 XML document on a single line.

    The message follows the normative schema of A.5.1.1 (RELAX NG; since CP-2399 every
    participant object needs a ParticipantObjectName) and, where medimg knows the fields, the
    DICOM specific messages of A.5.3. Codes are DCM (PS3.16) unless noted.

    EventID and EventActionCode, by the first rule that matches:

    ==========================================  =====================================  ======
    event                                       EventID                                action
    ==========================================  =====================================  ======
    outcome UNAUTHENTICATED                     110114 User Authentication (A.5.3.12)  E
    action EXPORT                               110106 Export (A.5.3.4)                R
    resource ``auditEvents...``/``checkpoints`` 110101 Audit Log Used (A.5.3.2)        C/R/U/D/E
    READ of a collection (``studies``, ...)     110112 Query (A.5.3.10)                E
    CREATE of a study/series/instance           110104 DICOM Instances Transferred     C
    DELETE of ``studies/{uid}``                 110105 DICOM Study Deleted             D
    READ/UPDATE/DELETE/EXECUTE of imaging       110103 DICOM Instances Accessed        R/U/D/R
    anything else (models, trainingJobs, ...)   110100 Application Activity            C/R/U/D/E
    ==========================================  =====================================  ======

    - Action codes otherwise are CREATE C, READ R, UPDATE U, DELETE D, EXECUTE E. The sections
      named above restrict them: an export reads data out (R), a query executes (E), a login
      is E, and A.5.3.6 knows no E, so a computation on instances (a prediction) is a read.
    - A failed login is a User Authentication event with EventTypeCode 110122 Login, whatever
      was attempted; a permission denial keeps the event of what was attempted, with a failed
      outcome, so "who tried to read study X" finds it.
    - DCM has no event for machine-learning artifacts: events on models and training jobs are
      Application Activity (activity of the platform's own application) with their own action
      code; A.5.3.1 describes only application start and stop, so those messages claim the
      family, not that section. The method EventTypeCode below says exactly what ran.
    - EventOutcomeIndicator: SUCCESS 0; UNAUTHENTICATED and PERMISSION_DENIED 4 (minor: the
      caller may retry with other credentials, HTTP 4xx in FHIR's terms); FAILURE 8 (serious,
      HTTP 5xx). 12 (application made unavailable) is never claimed: events do not say so.
      Failures carry a fixed EventOutcomeDescription, never free text.
    - EventDateTime is event_time in UTC. record_time and the log position are the log's own
      metadata, proven by its checkpoints, and are not exported.
    - EventTypeCode: the full gRPC method as a code in the private scheme 99MEDIMG (as IHE uses
      transaction codes there), meaning ``Service/Method``; 110122 Login on User
      Authentication; 110127 Emergency Override Started when a break-glass reason is given.

    Active participants: the calling workload (UserID its SPIFFE ID, UserIsRequestor true,
    RoleIDCode 110153 Source for transfers in, 110152 Destination for exports, else 110150
    Application), then the end user where one is behind the call (UserID the token subject,
    UserIsRequestor true, one RoleIDCode per medimg role in the 99MEDIMG scheme). The
    AuditSourceIdentification is the reporting service (AuditSourceTypeCode 4, application
    server process).

    Participant objects:

    - the resource: a study, series or instance is the study (ID the Study Instance UID,
      IDTypeCode 110180, type 2 system object, role 3 report, as A.5.3.6), with the series and
      SOP instance UIDs as ParticipantObjectDetail ``SeriesInstanceUID``/``SOPInstanceUID``;
      the audit log is the URI ``auditEvents...`` (IDTypeCode RFC-3881 12 URI, role 13
      security resource, name "Security Audit Log", as A.5.3.2); a collection is a query
      (URI, role 24) without ParticipantObjectQuery, since events do not hold the query; a
      training job is a URI with role 20 job; a model or anything else is a URI with no role.
      The name is the resource name. DataLifeCycle, only on success: CREATE 1, READ and
      EXECUTE 6, UPDATE 3, DELETE 14, EXPORT 10.
    - the patient pseudonym, where present: type 1 person, role 1 patient, IDTypeCode
      RFC-3881 2 Patient Number (A.5.3.6). The schema needs a name and medimg holds no patient
      name, by design, so the name is the pseudonym again: no PHI is invented or exported.
    - ParticipantObjectDetail on the first object (the resource; without one, the gRPC method;
      without that, the event itself as ``urn:uuid:{event_id}``): ``medimg-event-id``,
      ``trace-id`` (the W3C trace id) and ``break-glass-reason``, base64 of UTF-8 as the
      schema requires.

    Not in the message: A.5.3.4 asks an export for the media or destination, and A.5.3.10 a
    query for its content; events do not record them, and nothing is made up in their place.
    Characters XML 1.0 cannot carry at all (control characters) become U+FFFD; line breaks in
    values become character references, so a message never spans two lines.
    """
    classified = classify(event)
    root = ElementTree.Element("AuditMessage")
    identification = _sub(
        root,
        "EventIdentification",
        EventActionCode=classified.action,
        EventDateTime=_time(event.event_time),
        EventOutcomeIndicator=classified.outcome,
    )
    _coded(identification, "EventID", classified.event_id)
    for code in classified.type_codes:
        _coded(identification, "EventTypeCode", code)
    if classified.outcome_description:
        _sub(identification, "EventOutcomeDescription").text = classified.outcome_description
    workload = _sub(root, "ActiveParticipant", UserID=event.actor.workload, UserIsRequestor="true")
    _coded(workload, "RoleIDCode", classified.workload_role)
    if event.actor.user:
        user = _sub(root, "ActiveParticipant", UserID=event.actor.user, UserIsRequestor="true")
        for role in _roles(event):
            _coded(user, "RoleIDCode", Code(role, role, LOCAL, FHIR_ROLE))
    source = _sub(root, "AuditSourceIdentification", AuditSourceID=event.service)
    _sub(source, "AuditSourceTypeCode", **{"csd-code": "4"})
    for obj in _dicom_objects(event, classified.resource):
        _dicom_object(root, obj)
    body = ElementTree.tostring(root, encoding="unicode")
    # ElementTree escapes line breaks in attributes but not in text; these are equivalent.
    body = body.replace("\r", "&#13;").replace("\n", "&#10;")
    return (_XML_DECLARATION + body).encode()


def _sub(parent: ElementTree.Element, tag: str, **attributes: str) -> ElementTree.Element:
    return ElementTree.SubElement(parent, tag, {k: _xml(v) for k, v in attributes.items()})


def _xml(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _coded(parent: ElementTree.Element, tag: str, code: Code) -> None:
    attributes = {
        "csd-code": code.code,
        "codeSystemName": code.scheme,
        "originalText": code.meaning,
    }
    _sub(parent, tag, **attributes)


def _roles(event: pb.AuditEvent) -> list[str]:
    return [_token(role) for role in event.actor.roles if role.strip()]


def _token(value: str) -> str:
    # Codes are xsd:token in DICOM and FHIR `code`: no outer or repeated whitespace. A DICOM
    # reader would collapse it anyway; doing it here keeps both exports equal and FHIR valid.
    return " ".join(value.split())


@dataclass(frozen=True)
class DicomObject:
    """One ParticipantObjectIdentification of a DICOM audit message."""

    object_id: str
    id_type: Code
    type_code: str
    name: str
    role: str | None = None
    lifecycle: tuple[str, str] | None = None
    details: tuple[tuple[str, str], ...] = ()


def _dicom_objects(event: pb.AuditEvent, resource: Resource) -> list[DicomObject]:
    details = [("medimg-event-id", event.event_id)]
    if event.trace_id:
        details.append(("trace-id", event.trace_id))
    if event.break_glass_reason:
        details.append(("break-glass-reason", event.break_glass_reason))
    lifecycle = _lifecycle(event)
    objects: list[DicomObject] = []
    if resource.kind == Kind.NONE:
        target = event.method or _urn(event.event_id) or event.event_id
        objects.append(DicomObject(target, URI, "2", target, details=tuple(details)))
    elif resource.kind in _IMAGING:
        uids = [("SeriesInstanceUID", resource.series), ("SOPInstanceUID", resource.instance)]
        imaging = tuple((name, uid) for name, uid in uids if uid) + tuple(details)
        objects.append(
            DicomObject(
                resource.study, STUDY_INSTANCE_UID, "2", resource.name, "3", lifecycle, imaging
            )
        )
    else:
        role, name = _object_role(resource)
        if resource.kind == Kind.COLLECTION:
            lifecycle = None  # a query is not data with a life cycle
        objects.append(DicomObject(resource.name, URI, "2", name, role, lifecycle, tuple(details)))
    if event.patient_pseudonym:
        pseudonym = event.patient_pseudonym
        objects.append(DicomObject(pseudonym, PATIENT_NUMBER, "1", pseudonym, "1"))
    return objects


def _object_role(resource: Resource) -> tuple[str | None, str]:
    if resource.kind == Kind.AUDIT_LOG:
        return "13", "Security Audit Log"
    if resource.kind == Kind.COLLECTION:
        return "24", resource.name
    if resource.kind == Kind.TRAINING_JOB:
        return "20", resource.name
    return None, resource.name


def _dicom_object(root: ElementTree.Element, obj: DicomObject) -> None:
    attributes = {"ParticipantObjectID": obj.object_id, "ParticipantObjectTypeCode": obj.type_code}
    if obj.role:
        attributes["ParticipantObjectTypeCodeRole"] = obj.role
    if obj.lifecycle:
        attributes["ParticipantObjectDataLifeCycle"] = obj.lifecycle[0]
    element = _sub(root, "ParticipantObjectIdentification", **attributes)
    _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
    _sub(element, "ParticipantObjectName").text = _xml(obj.name)
    for kind, value in obj.details:
        _sub(element, "ParticipantObjectDetail", type=kind, value=_base64(value))


def _base64(value: str) -> str:
    return base64.b64encode(value.encode()).decode("ascii")


def dicom_xml_chunks(events: Iterable[pb.AuditEvent], chunk_events: int = 500) -> Iterator[bytes]:
    """The DICOM audit messages of the events, one XML document per line, in chunks.

    Framing: each event is one complete XML document (with its own XML declaration) on one
    line, ended by a line feed, the last one too, so the stream splits on b"\\n" into documents
    and concatenates like NDJSON. No document contains a raw line break (see
    `dicom_audit_message`). A chunk holds the lines of up to `chunk_events` events; no events
    give no chunks.
    """
    if chunk_events < 1:
        raise ValueError("chunk_events must be at least 1")
    lines: list[bytes] = []
    for event in events:
        lines.append(dicom_audit_message(event) + b"\n")
        if len(lines) == chunk_events:
            yield b"".join(lines)
            lines = []
    if lines:
        yield b"".join(lines)


# --- FHIR -----------------------------------------------------------------------------------


def fhir_audit_event(event: pb.AuditEvent) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource, as the JSON object it serialises to.

    The codes are those of `dicom_audit_message`, mapped as FHIR R4 maps AuditEvent to DICOM:

    - ``id`` the event id (a UUID is a valid FHIR id); ``type`` the DCM EventID; ``subtype``
      the EventTypeCodes (the gRPC method in the local system FHIR_METHOD, 110122 Login,
      110127 Emergency Override Started); ``action`` and ``outcome`` the same codes as the
      DICOM message; ``outcomeDesc`` the fixed description of a failure; ``recorded`` the
      event time (FHIR's DICOM mapping of EventDateTime).
    - ``purposeOfEvent``: break-glass access is v3-ActReason BTG "break the glass", with the
      stated reason as the text.
    - ``agent``: the workload (``who.identifier`` its SPIFFE ID as a URI, ``type`` the DCM role
      of the DICOM message, requestor), then the user where present (``who.identifier`` the
      token subject, a ``role`` per medimg role in the local system FHIR_ROLE, requestor).
    - ``source``: the reporting service as observer, type 4 "Application Server".
    - ``entity``: the resource (``what.identifier`` the resource name, type 2 "System Object",
      object-role and dicom-audit-lifecycle codes as in the DICOM message, name "Security
      Audit Log" for the log); the patient pseudonym (type Patient, role 1 "Patient"); the
      trace id as IHE BALP's XrequestId entity, its code for a transport's request id (BALP
      publishes no code for W3C traceparent yet).

    FHIR forbids empty strings and arrays, so absent fields are left out, never emptied.
    """
    classified = classify(event)
    resource: dict[str, Any] = {"resourceType": "AuditEvent"}
    if _FHIR_ID.fullmatch(event.event_id):
        resource["id"] = event.event_id
    resource["type"] = _coding(classified.event_id)
    if classified.type_codes:
        resource["subtype"] = [_coding(code) for code in classified.type_codes]
    resource["action"] = classified.action
    resource["recorded"] = _time(event.event_time)
    resource["outcome"] = classified.outcome
    if classified.outcome_description:
        resource["outcomeDesc"] = classified.outcome_description
    if event.break_glass_reason:
        resource["purposeOfEvent"] = [
            {
                "coding": [
                    {"system": FHIR_ACT_REASON, "code": "BTG", "display": "break the glass"}
                ],
                "text": event.break_glass_reason,
            }
        ]
    resource["agent"] = _fhir_agents(event, classified)
    resource["source"] = {
        "observer": {"display": event.service},
        "type": [{"system": FHIR_SOURCE_TYPE, "code": "4", "display": "Application Server"}],
    }
    entities = _fhir_entities(event, classified.resource)
    if entities:
        resource["entity"] = entities
    return resource


def _coding(code: Code) -> dict[str, str]:
    return {"system": code.system, "code": code.code, "display": code.meaning}


def _fhir_agents(event: pb.AuditEvent, classified: Classified) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = [
        {
            "type": {"coding": [_coding(classified.workload_role)]},
            "who": {"identifier": {"system": URI_SYSTEM, "value": event.actor.workload}},
            "requestor": True,
        }
    ]
    if event.actor.user:
        user: dict[str, Any] = {}
        roles = _roles(event)
        if roles:
            user["role"] = [
                {"coding": [_coding(Code(role, role, LOCAL, FHIR_ROLE))], "text": role}
                for role in roles
            ]
        user["who"] = {"identifier": {"value": event.actor.user}}
        user["requestor"] = True
        agents.append(user)
    return agents


def _fhir_entities(event: pb.AuditEvent, resource: Resource) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if resource.kind != Kind.NONE:
        entity: dict[str, Any] = {
            "what": {"identifier": {"value": resource.name}},
            "type": {"system": FHIR_ENTITY_TYPE, "code": "2", "display": _ENTITY_TYPES["2"]},
        }
        role = "3" if resource.kind in _IMAGING else _object_role(resource)[0]
        if role:
            entity["role"] = {
                "system": FHIR_OBJECT_ROLE,
                "code": role,
                "display": _OBJECT_ROLES[role],
            }
        lifecycle = _lifecycle(event)
        if lifecycle and resource.kind != Kind.COLLECTION:
            code, display = lifecycle
            entity["lifecycle"] = {"system": FHIR_LIFECYCLE, "code": code, "display": display}
        if resource.kind == Kind.AUDIT_LOG:
            entity["name"] = "Security Audit Log"
        entities.append(entity)
    if event.patient_pseudonym:
        entities.append(
            {
                "what": {"type": "Patient", "identifier": {"value": event.patient_pseudonym}},
                "type": {"system": FHIR_RESOURCE_TYPES, "code": "Patient", "display": "Patient"},
                "role": {"system": FHIR_OBJECT_ROLE, "code": "1", "display": _OBJECT_ROLES["1"]},
            }
        )
    if event.trace_id:
        entities.append(
            {
                "what": {"identifier": {"value": event.trace_id}},
                "type": {
                    "system": FHIR_BALP_ENTITY,
                    "code": "XrequestId",
                    "display": "transport specific unique identifier where http X-Request-Id"
                    " is used",
                },
            }
        )
    return entities


class FhirBundleWriter:
    """Writes a FHIR R4 Bundle (type collection) of AuditEvents as compact JSON, in pieces.

    `add` returns the text of the next entries (the bundle's head before the first), and
    `finish` closes the document, so a caller that gets events in batches, synchronous or
    not, streams one JSON document in bounded memory. Each entry's fullUrl is
    ``urn:uuid:{event_id}``. No events give a bundle without ``entry`` (FHIR JSON forbids an
    empty array). The output is byte-for-byte the same for the same events: keys keep the
    order they are built in, and no timestamp of the export is added.
    """

    _HEAD = '{"resourceType":"Bundle","type":"collection"'

    def __init__(self) -> None:
        self._count = 0

    def add(self, events: Iterable[pb.AuditEvent]) -> bytes:
        parts = []
        for event in events:
            entry: dict[str, Any] = {"resource": fhir_audit_event(event)}
            urn = _urn(event.event_id)
            if urn:
                entry = {"fullUrl": urn, **entry}
            parts.append((self._HEAD + ',"entry":[' if self._count == 0 else ",") + _json(entry))
            self._count += 1
        return "".join(parts).encode()

    def finish(self) -> bytes:
        return b"]}" if self._count else (self._HEAD + "}").encode()


def fhir_bundle_chunks(events: Iterable[pb.AuditEvent], chunk_events: int = 500) -> Iterator[bytes]:
    """The Bundle of `FhirBundleWriter` in chunks of up to `chunk_events` entries.

    The concatenation of the chunks is one JSON document; the last chunk closes it.
    """
    if chunk_events < 1:
        raise ValueError("chunk_events must be at least 1")
    writer = FhirBundleWriter()
    iterator = iter(events)
    while batch := list(itertools.islice(iterator, chunk_events)):
        yield writer.add(batch)
    yield writer.finish()


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
