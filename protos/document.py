"""Writes docs/API.md, the API guide, from protos/: services, RPCs, messages and enums with their comments.

Run: python protos/document.py [--out FILE] [--check]. docs/API.md is only ever written by this
script; tests/test_api_doc.py fails when it differs from what the protos say.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generate.py, also when imported by path
from generate import PROTO_ROOT, proto_files  # noqa: E402

DEFAULT_OUT = PROTO_ROOT.parent / "docs" / "API.md"

# Paths into FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto
# (the field numbers of descriptor.proto), as SourceCodeInfo.Location.path uses them.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

INTRO = """\
# Nexus Data Service API

Written by `python protos/document.py` from the protos in `protos/` (the API contract); do not edit
by hand. `tests/test_api_doc.py` fails when this file and the protos disagree.

**Calling it.** The server has reflection on, so grpcurl needs no proto files. Every call but
health and reflection carries credentials in the `authorization` metadata as
`Bearer <key>` (an API key, or a JWT where the server accepts them):

```bash
grpcurl -plaintext -H "authorization: Bearer $KEY" localhost:50051 list
grpcurl -plaintext -H "authorization: Bearer $KEY" -d '{"id": "<task id>"}' \\
  localhost:50051 nexus.work.v1.WorkService/GetTask
```

**Errors** are a gRPC status code with a `google.rpc.Status` in its details (AIP-193): exactly one
`ErrorInfo` (domain `nexus`, an UPPER_SNAKE reason), `BadRequest` for invalid input and
`ResourceInfo` for missing resources. README.md tells which code each failure gets.

**Field behaviour.** *output only*: set by the server; *input only*: accepted, never returned;
*immutable*: set when the resource is created, not changed after; *required*: must be set. They
come from `google.api.field_behavior` where a field has it, otherwise from the field's comment.

**total_size** of a List or Search (AIP-158) is exact up to the server's exact count limit
(`NEXUS_EXACT_COUNT_LIMIT`, 10,000 by default) and an estimate above it, never below the limit + 1:
PostgreSQL's planner estimate of the matching rows, or on SQLite the limit + 1 itself ("more than
the limit"). A caller whose role limits the rows it may see gets the limit + 1 on both databases
(an estimate would move with the rows hidden from it). An estimate is never below the rows the
pages so far returned, plus one while there is a next page. A List's `count_only` always counts
exactly.

**Search** ranks a window of its matches: the first 300 in the search index's own order (about the
order rows were added). Fewer matches rank every one of them; with more, a match beyond the window
is neither ranked nor returned, and the pages cover the window. A Search's total_size is exact up
to the window's size (300) and estimated above it, as a List's is above its limit.

**Pages.** One page is read as of one moment: its total_size and its rows agree whatever is written
meanwhile. Each page of a walk is read on its own: a List's page token holds the last row's key, so
a walk neither repeats nor skips a row that stays; a Search's holds an offset into its ranking, so
while its matches change (a hit deleted, rows written that move the scores) a walk may repeat or
miss one.
"""


def compile_descriptors():
    """Every proto in protos/ compiled with its comments, as a FileDescriptorSet."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    try:  # registers the google.api.field_behavior extension, so FieldOptions parse it
        import google.api.field_behavior_pb2  # noqa: F401
    except ImportError:  # pragma: no cover - googleapis-common-protos is a dependency
        pass
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(comments: dict, path: tuple) -> str:
    """The leading comment at path (trailing one when there is none), joined into one line."""
    loc = comments.get(path)
    if loc is None:
        return ""
    text = loc.leading_comments or loc.trailing_comments
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _anchor(full_name: str) -> str:
    return full_name.replace(".", "-").lower()


class Renderer:
    def __init__(self, files):
        self.files = [f for f in files.file if f.package.startswith("nexus.")]
        self.local = {}  # ".pkg.Name" -> kind, for links
        for f in self.files:
            for _, name in self._walk_messages(f.package, f.message_type):
                self.local["." + name] = "message"
            for _, name in self._walk_enums(f):
                self.local["." + name] = "enum"

    @staticmethod
    def _walk_messages(prefix, messages, path=(_FILE_MESSAGE,)):
        for i, msg in enumerate(messages):
            name = f"{prefix}.{msg.name}"
            here = (*path, i)
            yield (msg, here), name
            yield from Renderer._walk_messages(name, msg.nested_type, (*here, _MSG_NESTED))

    def _walk_enums(self, f):
        for i, enum in enumerate(f.enum_type):
            yield (enum, (_FILE_ENUM, i)), f"{f.package}.{enum.name}"
        for (msg, path), name in self._walk_messages(f.package, f.message_type):
            for i, enum in enumerate(msg.enum_type):
                yield (enum, (*path, _MSG_ENUM, i)), f"{name}.{enum.name}"

    def _type_ref(self, type_name: str) -> str:
        name = type_name.lstrip(".")
        if type_name in self.local:
            return f"[`{name}`](#{_anchor(name)})"
        return f"`{name}`"

    def _field_type(self, field, nested_maps) -> str:
        from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

        if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
            if field.type_name in nested_maps:
                key, value = nested_maps[field.type_name]
                return f"map<{self._field_type(key, {})}, {self._field_type(value, {})}>"
            return self._type_ref(field.type_name)
        return "`" + F.Type.Name(field.type)[len("TYPE_"):].lower() + "`"

    @staticmethod
    def _behaviours(field, comment: str) -> list[str]:
        found = []
        try:
            from google.api import field_behavior_pb2 as fb

            for b in field.options.Extensions[fb.field_behavior]:
                found.append(fb.FieldBehavior.Name(b).lower().replace("_", " "))
        except (ImportError, KeyError):  # pragma: no cover
            pass
        lowered = comment.lower()
        for phrase in ("output only", "input only", "immutable", "required"):
            if phrase in lowered and phrase not in found:
                found.append(phrase)
        return found

    def render(self) -> str:
        out = [INTRO, "\n**Contents.**\n\n"]
        for f in self.files:
            services = ", ".join(
                f"[`{s.name}`](#{_anchor(f'{f.package}.{s.name}')})" for s in f.service
            )
            out.append(f"- [`{f.package}`](#{_anchor(f.package)})" + (f": {services}\n" if services else "\n"))
        for f in self.files:
            comments = {tuple(loc.path): loc for loc in f.source_code_info.location}
            out.append(f'\n## Package `{f.package}`\n\n<a id="{_anchor(f.package)}"></a>\n\n_File `protos/{f.name}`._\n')
            for si, service in enumerate(f.service):
                full = f"{f.package}.{service.name}"
                out.append(f'\n### Service `{full}`\n\n<a id="{_anchor(full)}"></a>\n')
                doc = _comment(comments, (_FILE_SERVICE, si))
                if doc:
                    out.append(f"\n{doc}\n")
                out.append("\n| RPC | request → response | description |\n|---|---|---|\n")
                for mi, m in enumerate(service.method):
                    req = ("stream " if m.client_streaming else "") + self._type_ref(m.input_type)
                    resp = ("stream " if m.server_streaming else "") + self._type_ref(m.output_type)
                    desc = _comment(comments, (_FILE_SERVICE, si, _SERVICE_METHOD, mi))
                    out.append(f"| `{m.name}` | {req} → {resp} | {_cell(desc)} |\n")
            messages = list(self._walk_messages(f.package, f.message_type))
            if messages:
                out.append(f"\n### Messages of `{f.package}`\n")
            for (msg, path), name in messages:
                if msg.options.map_entry:
                    continue
                out.append(self._message(msg, path, name, comments))
            enums = list(self._walk_enums(f))
            if enums:
                out.append(f"\n### Enums of `{f.package}`\n")
            for (enum, path), name in enums:
                out.append(self._enum(enum, path, name, comments))
        return "".join(out)

    def _message(self, msg, path, name, comments) -> str:
        from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

        parts = [f'\n#### `{name}`\n\n<a id="{_anchor(name)}"></a>\n']
        doc = _comment(comments, path)
        if doc:
            parts.append(f"\n{doc}\n")
        if not msg.field:
            parts.append("\nNo fields.\n")
            return "".join(parts)
        nested_maps = {
            f".{name}.{n.name}": (n.field[0], n.field[1]) for n in msg.nested_type if n.options.map_entry
        }
        parts.append("\n| field | type | label | description | behaviour |\n|---|---|---|---|---|\n")
        for fi, field in enumerate(msg.field):
            comment = _comment(comments, (*path, _MSG_FIELD, fi))
            if field.type_name in nested_maps:
                label = "map"
            elif field.label == F.LABEL_REPEATED:
                label = "repeated"
            elif field.proto3_optional:
                label = "optional"
            elif field.HasField("oneof_index"):
                oneof = msg.oneof_decl[field.oneof_index].name
                label = f"oneof `{oneof}`"
            else:
                label = ""
            behaviour = ", ".join(self._behaviours(field, comment))
            parts.append(
                f"| `{field.name}` | {self._field_type(field, nested_maps)} | {label} | {_cell(comment)} | {behaviour} |\n"
            )
        for oi, oneof in enumerate(msg.oneof_decl):
            members = [f for f in msg.field if f.HasField("oneof_index") and f.oneof_index == oi]
            if all(f.proto3_optional for f in members):
                continue
            doc = _comment(comments, (*path, _MSG_ONEOF, oi))
            names = ", ".join(f"`{f.name}`" for f in members)
            parts.append(f"\nOneof `{oneof.name}` (at most one of {names})" + (f": {doc}\n" if doc else ".\n"))
        return "".join(parts)

    def _enum(self, enum, path, name, comments) -> str:
        parts = [f'\n#### `{name}`\n\n<a id="{_anchor(name)}"></a>\n']
        doc = _comment(comments, path)
        if doc:
            parts.append(f"\n{doc}\n")
        parts.append("\n| value | number | description |\n|---|---|---|\n")
        for vi, value in enumerate(enum.value):
            comment = _comment(comments, (*path, _ENUM_VALUE, vi))
            parts.append(f"| `{value.name}` | {value.number} | {_cell(comment)} |\n")
        return "".join(parts)


def render() -> str:
    return Renderer(compile_descriptors()).render()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs, write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else None
        if current != text:
            sys.exit(f"{args.out} is stale: run python protos/document.py")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
