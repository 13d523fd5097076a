"""Identity domain: users, roles, API keys, and their custom methods."""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from typing import TYPE_CHECKING, Any

from nexus.identity.v1 import identity_pb2 as pb
from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    String,
    Text,
    Uuid,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from db import errors, secrets
from db.base import Base, ResourceMixin, SoftDeleteMixin, json_list, json_object, link_table, one_of, optional_timestamp, utcnow
from db.engine import reads, writes, changes
from db.engine.call import CURRENT_CALL, Call, current_call
from db.engine.codecs import InputCodec, OutputCodec, SizeLimit, StringListCodec, check_chars, check_text
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import ROLE_RANK, Access, mine


# ---------------------------------------------------------------- tables

USER_ROLES = ("admin", "manager", "user", "guest")


user_roles = link_table("user_roles", ("user_id", "users.id"), ("role_id", "roles.id"))


class User(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "users"
    __table_args__ = (
        one_of("role", USER_ROLES),
        Index("ix_users_create_time_id", "create_time", "id"),
        # A page by update_time (migration 0017; tests/test_index_backed.py).
        Index("ix_users_update_time_id", "update_time", "id"),
    )

    username: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # NULL for a user without one (EnsureUser by external id alone): several users may have none.
    email: Mapped[str | None] = mapped_column(String(320), nullable=True, unique=True)
    external_id: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    full_name: Mapped[str | None] = mapped_column(String(255))
    avatar_url: Mapped[str | None] = mapped_column(String(2048))
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="user", index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    is_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    preferences: Mapped[json_object]
    password_hash: Mapped[str | None] = mapped_column(String(255))
    last_login_time: Mapped[optional_timestamp]

    roles: Mapped[list[Role]] = relationship(secondary=user_roles, lazy="selectin", order_by="Role.name")


class Role(ResourceMixin, Base):
    __tablename__ = "roles"
    __table_args__ = (Index("ix_roles_create_time_id", "create_time", "id"),)

    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    permissions: Mapped[json_list]


class ApiKey(ResourceMixin, Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        one_of("role", USER_ROLES),
        Index("ix_api_keys_create_time_id", "create_time", "id"),
        # A name is unique among its user's keys (and among the keys of no user): a user who
        # sees only its own keys learns nothing of other names from ALREADY_EXISTS.
        Index("uq_api_keys_user_id_name", "user_id", "name", unique=True,
              postgresql_where=text("user_id IS NOT NULL"), sqlite_where=text("user_id IS NOT NULL")),
        Index("uq_api_keys_name_without_user", "name", unique=True,
              postgresql_where=text("user_id IS NULL"), sqlite_where=text("user_id IS NULL")),
    )

    name: Mapped[str] = mapped_column(String(128), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="user")
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False, unique=True)
    secret_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    expire_time: Mapped[optional_timestamp]
    revoke_time: Mapped[optional_timestamp]
    last_used_time: Mapped[optional_timestamp]
    # What the key may do beyond its role (KEY_SCOPES); only a key without a user holds any.
    scopes: Mapped[json_list]

    if TYPE_CHECKING:
        # Not a column: a new key's secret, set on its row by _api_key_rules for the secret
        # field of the CreateApiKey response (declared for type checking only, so the mapping
        # never sees it).
        plain_secret: str


# The scopes an API key may hold, and what each lets it do whatever its role (service/policy.py
# maps each to its methods). For the services that own identities elsewhere: they make the
# platform's users of their own without being admins.
KEY_SCOPES = {
    "identity.users.ensure": "EnsureUser: find or make users by their external id",
}

USERNAME = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


def _password(plain: str) -> dict[str, Any]:
    if not MIN_PASSWORD <= len(plain) <= MAX_PASSWORD:
        raise errors.InvalidArgument.field("password", f"must be {MIN_PASSWORD} to {MAX_PASSWORD} characters", reason="WEAK_PASSWORD")
    return {"password_hash": secrets.hash_secret(plain)}


MAX_PASSWORD_HASH = 255  # the column's length


class ReadyHashCodec(InputCodec):
    """`password_hash`: a hash made elsewhere (bcrypt, argon2id), stored as it is once its form
    is checked; never dumped. Errors name the field, never its value."""

    def __init__(self) -> None:
        super().__init__("password_hash", lambda value: {"password_hash": value})

    def load(self, msg: Any) -> dict[str, Any]:
        value = msg.password_hash
        if not value:
            return {}
        check_chars(value, self.limit, self.name)
        if msg.password:
            raise errors.InvalidArgument.field("password_hash", "set either password or password_hash, not both", reason="CONFLICTING_FIELDS")
        problem = secrets.ready_hash_problem(value)
        if problem is not None:
            raise errors.InvalidArgument.field("password_hash", problem, reason="INVALID_PASSWORD_HASH")
        return {"password_hash": value}


def _user_rules(session: Session, row: User, changed: set[str], creating: bool, call: Call) -> None:
    violations = errors.Violations()
    if not USERNAME.match(row.username or ""):
        violations.add("user.username", "must be 3 to 64 letters, digits, '.', '_' or '-'")
    elif (creating or "username" in changed) and _reserved_username(row):
        violations.add("user.username", f"{row.username!r}: usernames beginning {DERIVED_PREFIX!r} are those EnsureUser derives from an external id, each for its own")
    if row.email is not None:
        row.email = row.email.strip().lower() or None  # none: a user without an address
    if row.email is not None and not EMAIL.match(row.email):
        violations.add("user.email", f"{row.email[:80]!r} is not an e-mail address")
    if row.avatar_url and not row.avatar_url.startswith(("https://", "http://")):
        violations.add("user.avatar_url", "must be an http(s) URL")
    violations.raise_if_any()
    if not creating and "email" in changed and row.is_verified and _stored(session, row, User.email).email != row.email:
        row.is_verified = False  # a new address is not verified until VerifyUserEmail says so


def _stored(session: Session, row: Any, *columns: Any) -> Any:
    """The row's stored values of columns, as the update that is changing them read them."""
    model = columns[0].class_
    return session.connection().execute(select(*columns).where(model.id == row.id)).one()


USERS = REGISTRY.add(
    ResourceSpec(
        name="User",
        plural="Users",
        model=User,
        message=pb.User,
        singular_field="user",
        relation_fields={"roles": ("role_names", lambda role: role.name)},
        relation_columns={"roles": ("name",)},
        output_only=frozenset({"role_names", "last_login_time", "is_verified"}),
        required=frozenset({"username"}),
        extra_codecs={
            "password": InputCodec("password", _password),
            "password_hash": ReadyHashCodec(),
            "role_names": OutputCodec("role_names", lambda r: sorted(role.name for role in r.roles), repeated=True),
        },
        size_limits={"password": SizeLimit(chars=MAX_PASSWORD), "password_hash": SizeLimit(chars=MAX_PASSWORD_HASH)},
        orderable=("create_time", "update_time", "username", "email"),
        search_fields=(("username", "A"), ("full_name", "A"), ("email", "B")),
        batch_get=True,
        before_write=_user_rules,
        # Users change themselves; creating users is for admins.
        access=Access(manage=mine(User.id, "themselves"), admin_only=frozenset({"role", "is_active", "external_id", "password_hash"})),
        credentials=True,
        secrets={"password_hash": "password"},
    )
)


# ---------------------------------------------------------------- permissions

# Every permission a Role may hold, with the least built-in role that holds it: the method
# families of the service (service/policy.py), installed when it builds its method table. Until
# then no Role's permissions can be written: refused, never taken unchecked.
_PERMISSIONS: dict[str, str] = {}


def install_permissions(catalog: dict[str, str]) -> None:
    _PERMISSIONS.clear()
    _PERMISSIONS.update(catalog)


def built_in_permissions(role: str) -> list[str]:
    """The fixed permissions of a built-in role (admin, manager, user, guest): what its level allows."""
    rank = ROLE_RANK[role]
    return sorted(p for p, least in _PERMISSIONS.items() if ROLE_RANK[least] <= rank)


def known_permissions(permissions: Any) -> set[str]:
    """Of stored permissions, those the service knows (a role of the earlier layers may hold others: they allow nothing)."""
    return {p for p in permissions if p in _PERMISSIONS}


def assigned_roles(session: Session, user_id: uuid.UUID | None) -> list[tuple[str, list[str] | None]]:
    """(name, stored permissions) of every Role assigned to a user: one query."""
    if user_id is None:
        return []
    found = session.execute(
        select(Role.name, Role.permissions).join(user_roles, user_roles.c.role_id == Role.id).where(user_roles.c.user_id == user_id)
    )
    return [(name, permissions) for name, permissions in found]


class _RolePermissions(StringListCodec):
    """A Role's permissions; a built-in role's are always those of its level, whatever is stored."""

    def __init__(self) -> None:
        super().__init__(pb.Role.DESCRIPTOR.fields_by_name["permissions"], "permissions")

    def dump(self, row: Any, msg: Any) -> None:
        if getattr(row, "name", None) in ROLE_RANK and _PERMISSIONS:
            msg.permissions.extend(built_in_permissions(row.name))
            return
        super().dump(row, msg)


def _role_rules(session: Session, row: Role, changed: set[str], creating: bool, call: Call) -> None:
    if not USERNAME.match(row.name or ""):
        raise errors.InvalidArgument.field("role.name", "must be 3 to 64 letters, digits, '.', '_' or '-'")
    given = list(row.permissions or ())
    if row.name in ROLE_RANK:
        # A built-in role: its permissions are its level's. Sent unchanged (or left out when it
        # is created) they are taken; any other set is refused, and so is a custom role renamed
        # to a built-in name with other permissions.
        fixed = built_in_permissions(row.name)
        if set(given) != set(fixed) and ("permissions" in changed or (not creating and "name" in changed)):
            raise errors.FailedPrecondition(
                f"{row.name!r} is a built-in role: its permissions are those of its level and do not change"
                " (make a role of another name to hold other permissions)",
                reason="BUILT_IN_ROLE",
                metadata={"field": "role.permissions", "role": row.name},
            )
        row.permissions = fixed
        return
    if not (creating or "permissions" in changed) or not given:
        return
    if not _PERMISSIONS:
        raise errors.FailedPrecondition("the permission catalog is not loaded: roles' permissions are written through the service", reason="PERMISSIONS_NOT_LOADED")
    violations = errors.Violations()
    for i, permission in enumerate(given):
        if permission not in _PERMISSIONS:
            violations.add(f"role.permissions[{i}]", f"{permission[:80]!r} is not a permission (`nexus-data policy` lists them)", reason="UNKNOWN_PERMISSION")
    violations.raise_if_any()


ROLES = REGISTRY.add(
    ResourceSpec(
        name="Role",
        plural="Roles",
        model=Role,
        message=pb.Role,
        singular_field="role",
        required=frozenset({"name"}),
        extra_codecs={"permissions": _RolePermissions()},
        orderable=("create_time", "update_time", "name"),
        search_fields=(("name", "A"), ("description", "B")),
        before_write=_role_rules,
        # A change of a role's permissions changes what its users may call: cached credentials
        # (and open streams) are checked again.
        credentials=True,
    )
)


def _api_key_rules(session: Session, row: ApiKey, changed: set[str], creating: bool, call: Call) -> None:
    if creating:
        prefix, secret = secrets.new_api_key()
        row.key_prefix = prefix
        row.secret_hash = secrets.hash_secret(secret)
        # Transient: only the CreateApiKey response carries it; no later read can.
        row.plain_secret = secret
    if row.expire_time is not None and creating and row.expire_time <= utcnow():
        raise errors.InvalidArgument.field("api_key.expire_time", "must be in the future")
    if call.role != "admin" and (creating or "role" in changed):
        _within_caller_role(row, call, explicit="role" in changed)
    if row.user_id is not None and (creating or "role" in changed):
        _within_owner_role(session, row, explicit="role" in changed)
    if not creating and "expire_time" in changed and call.role != "admin":
        _only_sooner(session, row)
    if creating or "scopes" in changed or "user_id" in changed:
        _known_scopes(row)


def _known_scopes(row: ApiKey) -> None:
    """Scopes are KEY_SCOPES' names, each once (kept sorted), on a key without a user: a key
    acting for a user never does more than that user may."""
    # The first unknown one only: a hundred of them would make an error too large to send.
    unknown = next(((i, scope) for i, scope in enumerate(row.scopes or ()) if scope not in KEY_SCOPES), None)
    if unknown is not None:
        i, scope = unknown
        raise errors.InvalidArgument.field(
            f"api_key.scopes[{i}]", f"{scope[:80]!r} is not a scope; the scopes: {', '.join(sorted(KEY_SCOPES))}", reason="UNKNOWN_SCOPE"
        )
    row.scopes = sorted(set(row.scopes or ()))
    if row.scopes and row.user_id is not None:
        raise errors.InvalidArgument.field(
            "api_key.scopes", "only a key without user_id (a service's key) holds scopes: a user's key does what its user may", reason="SCOPE_ON_USER_KEY"
        )


def _within_caller_role(row: ApiKey, call: Call, explicit: bool) -> None:
    """A caller other than an admin gets keys at its own current role or lower (that of the
    credential it calls with: a manager calling with a user key makes user keys at most)."""
    if ROLE_RANK[row.role] <= ROLE_RANK[call.role]:
        return
    if not explicit:
        row.role = call.role
        return
    raise errors.PermissionDenied(
        f"a key's role is at most its maker's: {row.role!r} is above {call.role!r}",
        reason="ROLE_ABOVE_CALLER",
        metadata={"field": "api_key.role", "role": call.role},
    )


def _within_owner_role(session: Session, row: ApiKey, explicit: bool) -> None:
    """A key's role is at most its user's (authentication also takes the lower of the two, so a
    user demoted later takes its keys down with it). Left unset, it is lowered to the user's."""
    owner_role = session.connection().execute(select(User.role).where(User.id == row.user_id)).scalar()
    if owner_role is None or ROLE_RANK[row.role] <= ROLE_RANK[owner_role]:
        return  # (a missing user is NOT_FOUND from the reference check)
    if not explicit:
        row.role = owner_role
        return
    raise errors.InvalidArgument.field(
        "api_key.role", f"{row.role!r} is above the role of the key's user ({owner_role!r}): a key never does more than its user",
        reason="ROLE_ABOVE_OWNER",
    )


def _only_sooner(session: Session, row: ApiKey) -> None:
    """A key's owner may bring its expiry forward, never push it back, clear it or revive a
    revoked or expired key; an admin may."""
    stored = _stored(session, row, ApiKey.expire_time, ApiKey.revoke_time)
    if row.expire_time == stored.expire_time:
        return
    field = {"field": "api_key.expire_time"}
    if stored.revoke_time is not None:
        raise errors.FailedPrecondition("the API key was revoked: its expiry no longer changes", reason="KEY_REVOKED", metadata=field)
    if stored.expire_time is not None and stored.expire_time <= utcnow():
        raise errors.FailedPrecondition("the API key has expired: only an admin may revive it", reason="KEY_EXPIRED", metadata=field)
    if row.expire_time is None or (stored.expire_time is not None and row.expire_time > stored.expire_time):
        raise errors.PermissionDenied(
            "only an admin may extend an API key's expiry; its owner may only bring it forward",
            reason="KEY_EXPIRY_EXTENSION_DENIED",
            metadata=field,
        )


API_KEYS = REGISTRY.add(
    ResourceSpec(
        name="ApiKey",
        plural="ApiKeys",
        model=ApiKey,
        message=pb.ApiKey,
        singular_field="api_key",
        output_only=frozenset({"key_prefix", "revoke_time", "last_used_time"}),
        immutable=frozenset({"user_id"}),
        required=frozenset({"name"}),
        references={"user_id": "User"},
        owner_field="user_id",
        extra_codecs={"secret": OutputCodec("secret", lambda r: getattr(r, "plain_secret", None))},
        orderable=("create_time", "update_time", "name", "expire_time"),
        before_write=_api_key_rules,
        access=Access(
            read=mine(ApiKey.user_id, "their own keys"), manage=mine(ApiKey.user_id, "their own keys"), admin_only=frozenset({"user_id", "scopes"})
        ),
        credentials=True,
        secrets={"secret_hash": "secret"},
    )
)


# ---------------------------------------------------------------- custom methods


def lookup_user(session: Session, request: pb.LookupUserRequest) -> pb.User:
    key = request.WhichOneof("key")
    if key is None:
        raise errors.InvalidArgument.field("key", "set one of email, username or external_id", reason="REQUIRED_FIELD")
    value = getattr(request, key)
    if not value.strip():
        raise errors.InvalidArgument.field(key, "must not be empty", reason="REQUIRED_FIELD")
    column = User.email if key == "email" else getattr(User, key)
    if key == "email":
        value = value.strip().lower()
    row = session.scalars(select(User).where(column == value, User.delete_time.is_(None))).one_or_none()
    if row is None:
        raise errors.NotFound.resource("User", f"{key}={value}", key)
    return USERS.to_proto(row)


# What EnsureUser takes from a caller that is not an admin (an API key with the scope
# identity.users.ensure): a new user's own fields, never its role, state or password.
ENSURE_FIELDS = frozenset({"external_id", "username", "email", "full_name", "avatar_url", "preferences"})


DERIVED_PREFIX = "ext-"


def derived_username(external_id: str) -> str:
    """The username of a user EnsureUser makes without one: `ext-` and 16 hex digits of the
    SHA-256 of its external id; the same for the same id, and 64 bits apart from any other."""
    return DERIVED_PREFIX + hashlib.sha256(external_id.encode()).hexdigest()[:16]


def _reserved_username(row: User) -> bool:
    """A username of the derived form that is not the one derived from the row's own external id:
    anyone could otherwise take the name EnsureUser will derive for an id (which is public: a
    hash) and lock that id out of EnsureUser for good."""
    name = (row.username or "").lower()
    if not name.startswith(DERIVED_PREFIX):
        return False
    return not row.external_id or name != derived_username(row.external_id)


def ensure_user(session: Session, request: pb.EnsureUserRequest, call: Call) -> pb.EnsureUserResponse:
    external_id = request.user.external_id
    if not external_id.strip():  # (as LookupUser refuses it: an id of blanks could never be looked up)
        raise errors.InvalidArgument.field("user.external_id", "is required (and not only blanks)", reason="REQUIRED_FIELD")
    check_chars(external_id, USERS.codecs["external_id"].limit, "user.external_id")
    check_text(external_id, "user.external_id")
    if call.role != "admin":
        for fd, _ in request.user.ListFields():
            if fd.name not in ENSURE_FIELDS:
                raise errors.PermissionDenied(
                    f"only an admin may set user.{fd.name} through EnsureUser", reason="FIELD_ACCESS_DENIED", metadata={"field": f"user.{fd.name}"}
                )
    wanted = pb.User()
    wanted.CopyFrom(request.user)
    if not wanted.username:
        wanted.username = derived_username(external_id)
    for _ in range(2):
        row = session.scalars(select(User).where(User.external_id == external_id)).one_or_none()
        if row is not None:
            if row.delete_time is not None:
                # (Its id only to admins, who may undelete it: a deleted user is theirs alone to see.)
                raise errors.FailedPrecondition(
                    f"the user with external_id {external_id!r} is deleted; undelete it first",
                    reason="USER_DELETED",
                    metadata={"resource_id": str(row.id)} if call.role == "admin" else {},
                )
            return pb.EnsureUserResponse(user=USERS.to_proto(row), created=False)
        try:
            # A savepoint: losing a race with a concurrent EnsureUser must not abort the call.
            with session.begin_nested():
                created = _create_ensured(session, wanted, call)
            return pb.EnsureUserResponse(user=created, created=True)
        except IntegrityError:
            # Lost the race on external_id: the next pass finds the winner. A conflict on another
            # unique field (username, email) is real: translate() makes it ALREADY_EXISTS.
            if session.scalar(select(User.id).where(User.external_id == external_id)) is None:
                raise
            continue
    raise errors.Aborted("EnsureUser raced with another writer twice; retry", reason="TRANSACTION_CONFLICT")


def _create_ensured(session: Session, user: pb.User, call: Call) -> pb.User:
    """CreateUser of an ensured user. A caller that is not an admin was let in by its key's
    scope and sets only ENSURE_FIELDS (checked above); the user is made as an admin's CreateUser
    would make it (external_id is admins' to set), audited as the caller's."""
    request = pb.CreateUserRequest(user=user)
    if call.role == "admin":
        return writes.create(session, USERS, request, call)
    ensuring = Call(
        request_id=call.request_id, method=call.method, dialect=call.dialect, actor_type=call.actor_type,
        actor_id=call.actor_id, role="admin", actor_user_id=call.actor_user_id,
    )
    token = CURRENT_CALL.set(ensuring)
    try:
        return writes.create(session, USERS, request, ensuring)
    finally:
        CURRENT_CALL.reset(token)


def authenticate_user(session: Session, request: pb.AuthenticateUserRequest) -> pb.AuthenticateUserResponse:
    if not request.login:
        raise errors.InvalidArgument.field("login", "is required", reason="REQUIRED_FIELD")
    if not request.password:
        raise errors.InvalidArgument.field("password", "is required", reason="REQUIRED_FIELD")
    login = request.login.strip()
    row = session.scalars(
        select(User).where(
            (User.username == login) | (User.email == login.lower()), User.delete_time.is_(None)
        )
    ).first()
    ok = secrets.verify_password(row.password_hash if row is not None else None, request.password)
    if row is None or not ok or not row.is_active:
        return pb.AuthenticateUserResponse(authenticated=False)
    # A hash moved in (bcrypt) or of an older cost becomes an argon2id hash of today's cost, in
    # this login's transaction: the password is known only now.
    if row.password_hash and secrets.needs_rehash(row.password_hash):
        row.password_hash = secrets.hash_secret(request.password)
    row.last_login_time = utcnow()
    changes.flush(session)
    return pb.AuthenticateUserResponse(authenticated=True, user=USERS.to_proto(row))


def verify_user_email(session: Session, request: pb.VerifyUserEmailRequest) -> pb.User:
    row = reads.fetch(session, USERS, request.id, lock=True)
    if not row.is_verified:
        row.is_verified = True
        changes.flush(session)
    return USERS.to_proto(row)


def _user_and_role(session: Session, user_id: str, role_id: str) -> tuple[User, Role]:
    user = reads.fetch(session, USERS, user_id, field_path="user_id", lock=True)
    role = reads.fetch(session, ROLES, role_id, field_path="role_id")
    return user, role


def assign_role(session: Session, request: pb.AssignRoleRequest) -> pb.User:
    user, role = _user_and_role(session, request.user_id, request.role_id)
    if role not in user.roles:
        user.roles.append(role)
        user.update_time = utcnow()
        changes.flush(session)
    return USERS.to_proto(user)


def revoke_role(session: Session, request: pb.RevokeRoleRequest) -> pb.User:
    user, role = _user_and_role(session, request.user_id, request.role_id)
    if role in user.roles:
        user.roles.remove(role)
        user.update_time = utcnow()
        changes.flush(session)
    return USERS.to_proto(user)


def revoke_api_key(session: Session, request: pb.RevokeApiKeyRequest) -> pb.ApiKey:
    row = reads.fetch(session, API_KEYS, request.id, lock=True)
    if row.revoke_time is None:
        row.revoke_time = utcnow()
        changes.flush(session)
    return API_KEYS.to_proto(row)


def create_api_key(
    session: Session, name: str, role: str, user_id: str = "", expire_time: dt.datetime | None = None, scopes: tuple[str, ...] = ()
) -> tuple[pb.ApiKey, str]:
    """A new key through the standard create path; returns it and its secret (shown once)."""
    request = pb.CreateApiKeyRequest(
        api_key=pb.ApiKey(name=name, role=pb.UserRole.Value(f"USER_ROLE_{role.upper()}"), user_id=user_id, scopes=scopes)
    )
    if expire_time is not None:
        request.api_key.expire_time.FromDatetime(expire_time)
    call = current_call() or Call(dialect=session.get_bind().dialect.name)  # the CLI's, if it runs this
    created = writes.create(session, API_KEYS, request, call)
    return created, created.secret


def create_api_key_if_none(session: Session) -> str | None:
    """The bootstrap admin key of an empty database, or None when any key exists."""
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    try:
        with session.begin_nested():  # two replicas starting together: one wins, the other skips
            _, secret = create_api_key(session, "bootstrap-admin", "admin")
    except IntegrityError:
        return None
    return secret
