"""The `medimg` command: `up`, `down`, `status`, `token`, `certs`, `mesh`, `ingest`, `train`,
`audit`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from medimg_cli import ingest as medimg_ingest
from medimg_cli import k8s as medimg_k8s
from medimg_cli import mesh as meshlib
from medimg_cli import train as medimg_train
from medimg_cli import verify as audit_verify
from medimg_cli.pki import ensure_pki, mint_token, renew, retire_ca, start_ca_rotation
from medimg_cli.platform import Platform, default_state_dir, read_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medimg", description=__doc__)
    parser.add_argument(
        "--state", type=Path, default=None, help="state directory (default .medimg)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the platform until Ctrl-C or `medimg down`")
    up.add_argument("--demo", action="store_true", help="run the thin-slice demo once it is up")
    up.add_argument("--port-offset", type=int, default=0, help="shift every port by this much")
    commands.add_parser("down", help="stop the running platform")
    status = commands.add_parser("status", help="what runs and where")
    status.add_argument("--json", action="store_true")
    token = commands.add_parser("token", help="print a dev JWT for the gateway")
    token.add_argument("--user", required=True)
    token.add_argument("--role", action="append", required=True, dest="roles")
    token.add_argument("--ttl", type=int, default=3600, help="seconds")
    certs = commands.add_parser(
        "certs", help="create the dev CA, workload certificates and JWT key; renew certificates"
    )
    certs.add_argument(
        "--renew",
        action="append",
        default=[],
        metavar="NAME",
        help="re-issue this identity's certificate (new key and serial, same SPIFFE id; "
        "`all`: every identity); running Envoys reload it within seconds. During a CA "
        "rotation the next CA issues it. Repeatable.",
    )
    rotation = certs.add_mutually_exclusive_group()
    rotation.add_argument(
        "--ca-next",
        action="store_true",
        help="CA rotation, step 1: make the next CA and trust it beside the current one "
        "(ca.pem becomes both); renewals are issued by it from then on",
    )
    rotation.add_argument(
        "--ca-retire",
        action="store_true",
        help="CA rotation, step 3: once every certificate is the next CA's (--renew all), "
        "trust it alone; the old CA is forgotten",
    )
    render = commands.add_parser("mesh", help="render the Envoy configs from deploy/mesh.toml")
    render.add_argument("--out", type=Path, default=Path("deploy/envoy"))
    medimg_ingest.add_arguments(
        commands.add_parser("ingest", help="upload DICOM files and folders to the platform")
    )
    medimg_train.add_arguments(
        commands.add_parser("train", help="training jobs: list, get, watch one until it ends")
    )
    medimg_k8s.add_arguments(
        commands.add_parser("k8s", help="Kubernetes: render deploy/k8s from deploy/mesh.toml")
    )
    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify.add_arguments(
        audit_commands.add_parser(
            "verify", help="check the audit log's checkpoints, proofs and events (trusts no server)"
        )
    )

    args = parser.parse_args(argv)
    state = (args.state or default_state_dir()).resolve()
    handler = {
        "up": _up,
        "down": _down,
        "status": _status,
        "token": _token,
        "certs": _certs,
        "mesh": _mesh,
        "audit": audit_verify.command,
        "ingest": medimg_ingest.command,
        "train": medimg_train.command,
        "k8s": medimg_k8s.command,
    }[args.command]
    return handler(args, state)


def _up(args: argparse.Namespace, state: Path) -> int:
    if read_status(state) is not None:
        print(f"medimg is already running from {state}: `medimg status`", file=sys.stderr)
        return 1
    platform = Platform(state, port_offset=args.port_offset)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"starting medimg (state in {state}) …", flush=True)
    try:
        platform.start()
        _print_status(platform.status())
        if args.demo:
            from medimg_cli import demo

            demo.run(platform)
        print("\nmedimg is up. Ctrl-C or `medimg down` stops it.", flush=True)
        while not platform.dead():
            time.sleep(1)
        print(
            f"stopping: {', '.join(platform.dead())} exited; see {state / 'logs'}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping medimg …", flush=True)
        codes = platform.stop()
        print("stopped: " + ", ".join(f"{name}={code}" for name, code in codes.items()))


def _interrupt(signum: int, frame: object) -> None:
    # `medimg down` sends SIGTERM: stop as cleanly as on Ctrl-C.
    raise KeyboardInterrupt


def _down(args: argparse.Namespace, state: Path) -> int:
    status = read_status(state)
    if status is None:
        print("medimg is not running")
        return 0
    os.kill(int(status["pid"]), signal.SIGTERM)
    while read_status(state) is not None:
        time.sleep(0.2)
    print("medimg stopped")
    return 0


def _status(args: argparse.Namespace, state: Path) -> int:
    status = read_status(state)
    if args.json:
        print(json.dumps(status or {"running": False}, indent=2))
    elif status is None:
        print("medimg is not running")
    else:
        _print_status(status)
    return 0 if status else 3


def _print_status(status: dict[str, Any]) -> None:
    print(f"medimg (pid {status['pid']}), state in {status['state_dir']}")
    print(f"  gateway (REST)   {status['gateway']['url']}")
    print(
        f"  DIMSE            {status['dimse']['address']} (AE title {status['dimse']['ae_title']})"
    )
    for name, service in status["services"].items():
        print(
            f"  {name:<10} sidecar {service['sidecar']}  service {service['service']}  "
            f"metrics {service['metrics']}"
        )
    print(f"  database         {status['database_url']}")
    print(f"  redis            {status['redis_url']}")
    print(f"  dev CA           {status['ca']}")
    print(f"  ops cert / key   {status['ops_cert']}  {status['ops_key']}")


def _token(args: argparse.Namespace, state: Path) -> int:
    mesh = meshlib.load_mesh()
    pki = ensure_pki(state / "pki", mesh.trust_domain, mesh.namespace, mesh.all_identities())
    print(
        mint_token(
            pki,
            issuer=mesh.gateway.jwt_issuer,
            audience=mesh.gateway.jwt_audience,
            subject=args.user,
            roles=args.roles,
            ttl_seconds=args.ttl,
        )
    )
    return 0


def _certs(args: argparse.Namespace, state: Path) -> int:
    mesh = meshlib.load_mesh()
    identities = mesh.all_identities()
    if (args.ca_next or args.ca_retire) and args.renew:
        # Each step must have reached every Envoy before the next one starts.
        print(
            "medimg certs: --ca-next, --renew and --ca-retire are separate steps: run them "
            "one command at a time (docs/operations.md, Rotate certificates)",
            file=sys.stderr,
        )
        return 2
    renewing = identities if "all" in args.renew else args.renew
    unknown = [name for name in renewing if name not in identities]
    if unknown:
        print(
            f"medimg certs: not an identity of the mesh: {', '.join(unknown)} "
            f"(identities: {', '.join(identities)})",
            file=sys.stderr,
        )
        return 2
    pki = ensure_pki(state / "pki", mesh.trust_domain, mesh.namespace, identities)
    print(f"dev PKI in {pki.root}: CA {pki.ca_cert}, JWKS {pki.jwks}")
    try:
        if args.ca_next:
            following = start_ca_rotation(pki)
            print(
                f"next CA {pki.next_ca_cert} (serial {following.serial_number:x}) is trusted "
                f"beside the current one; once every Envoy lists it in /certs (ca_cert), "
                "`medimg certs --renew all`"
            )
        elif args.ca_retire:
            following = retire_ca(pki, identities)
            print(f"the CA is now {following.subject.rfc4514_string()} alone ({pki.ca_cert})")
    except ValueError as error:
        print(f"medimg certs: {error}", file=sys.stderr)
        return 1
    for name in dict.fromkeys(renewing):
        cert = renew(pki, name, mesh.spiffe(name))
        print(
            f"renewed {name}: serial {cert.serial_number:x}, issuer "
            f"{cert.issuer.rfc4514_string()}, valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({pki.cert(name)})"
        )
    return 0


def _mesh(args: argparse.Namespace, state: Path) -> int:
    from medimg_protos import DESCRIPTOR_SET_PATH

    mesh = meshlib.load_mesh()
    pki = ensure_pki(state / "pki", mesh.trust_domain, mesh.namespace, mesh.all_identities())
    written = meshlib.write_configs(meshlib.render(mesh, pki, DESCRIPTOR_SET_PATH), args.out)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
