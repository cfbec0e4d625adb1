"""The dynsec builders: roles that make Mosquitto enforce exactly ``gateway.acl``'s rules, the
commands and their answers, and the plugin's initial file.

``dynsec_allows`` models how the 2.0.11 plugin decides (checked on a live broker: ACLs by
descending priority, first match wins; ``subscribeLiteral`` compares strings;
``subscribePattern`` admits a filter only inside the pattern); the live tests in
test_mosquitto_broker.py cover the same ground with a real Mosquitto.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json

import pytest

from gateway.acl import Action, Principal, TopicAcl
from gateway.mosquitto import MosquittoError, MosquittoReason, dynsec
from gateway.mosquitto.dynsec import Acl, AclType, Enforcement
from gateway.protocol import topics
from gateway.store import IdentityState
from pki.profile import IdentityKind

_KIND = {
    IdentityKind.DEVICE: "device",
    IdentityKind.OPERATOR: "operator",
    IdentityKind.SERVICE: "service",
}


def _sub_within(pattern: str, topic_filter: str) -> bool:
    acl, sub = pattern.split("/"), topic_filter.split("/")
    for index, level in enumerate(acl):
        if level == "#":
            return True
        if index >= len(sub):
            return False
        if level == "+":
            if sub[index] == "#":
                return False
            continue
        if sub[index] != level:
            return False
    return len(acl) == len(sub)


def dynsec_allows(acls: tuple[Acl, ...], action: Action, topic: str) -> bool:
    if action is not Action.SUBSCRIBE and ("+" in topic or "#" in topic):
        return False  # a PUBLISH to a wildcard is a protocol error: the broker disconnects
    if action is Action.SUBSCRIBE:
        types = {AclType.SUBSCRIBE_LITERAL, AclType.SUBSCRIBE_PATTERN}
        default = dynsec.DEFAULT_ACL_ACCESS["subscribe"]
    elif action is Action.PUBLISH:
        types = {AclType.PUBLISH_SEND}
        default = dynsec.DEFAULT_ACL_ACCESS["publishClientSend"]
    else:
        types = {AclType.PUBLISH_RECEIVE}
        default = dynsec.DEFAULT_ACL_ACCESS["publishClientReceive"]
    for acl in sorted((a for a in acls if a.acltype in types), key=lambda a: -a.priority):
        if acl.acltype is AclType.SUBSCRIBE_LITERAL:
            matched = acl.topic == topic
        elif acl.acltype is AclType.SUBSCRIBE_PATTERN:
            matched = _sub_within(acl.topic, topic)
        else:
            matched = topics.topic_matches(acl.topic, topic)
        if matched:
            return acl.allow
    return default


def _corpus(*names: str) -> list[str]:
    """Topics of every kind for ``names``, and filters made from them with ``+`` at each level
    and ``#`` after each prefix."""
    concrete = [topics.CA_TOPIC, topics.CRL_TOPIC, "fg/v1/admin", "fg/v1/other", "$SYS/broker/x"]
    for name in names:
        concrete += [
            topics.telemetry(name),
            topics.state(name),
            topics.renew_request(name),
            topics.renew_response(name),
            topics.command(name, "reboot"),
            f"fg/v1/dev/{name}/cmd",
            f"fg/v1/dev/{name}/cmd/a/b",
            topics.quarantine(name),
            f"fg/v1/dev/{name}/quarantine",
            topics.enroll_request(name),
            topics.enroll_response(name),
            f"fg/v1/admin/{name}/req",
            f"fg/v1/admin/{name}/resp",
        ]
    filters = set(concrete) | {"#", "+", "+/+", "fg/#"}
    for topic in concrete:
        levels = topic.split("/")
        for index in range(len(levels)):
            filters.add("/".join([*levels[:index], "+", *levels[index + 1 :]]))
            filters.add("/".join([*levels[:index], "#"]))
    return sorted(filters)


CORPUS = _corpus("dev-a", "dev-b")
_ROLE_EXISTS = "Role already exists"
_NO_CLIENT = "Client not found"


@pytest.mark.parametrize(
    ("kind", "state"),
    list(itertools.product(IdentityKind, IdentityState)),
    ids=lambda v: str(v),
)
def test_identity_roles_allow_exactly_what_the_topic_acl_allows(
    kind: IdentityKind, state: IdentityState
) -> None:
    name = "gateway" if kind is IdentityKind.SERVICE else "dev-a"
    acls = dynsec.identity_acls(kind, name, state)
    rules = TopicAcl(lambda identity: state if identity == name else None)
    principal = Principal(_KIND[kind], name, "operational")  # type: ignore[arg-type]
    for topic, action in itertools.product(CORPUS, Action):
        if topic.startswith("$"):
            # Stricter than TopicAcl on purpose: "#" never matches the broker's own $ topics
            # for sending or receiving ($CONTROL would let a client rewrite security). A $
            # subscription may be granted, but nothing ever flows through it (seen on 2.0.11).
            if action is not Action.SUBSCRIBE:
                assert not dynsec_allows(acls, action, topic), (action, topic)
            continue
        expected = rules.allows(principal, action, topic)
        assert dynsec_allows(acls, action, topic) == expected, (action, topic)


def test_a_service_other_than_the_gateway_gets_nothing() -> None:
    assert dynsec.identity_acls(IdentityKind.SERVICE, "metrics", IdentityState.ACTIVE) == ()


def test_pending_and_revoked_roles_are_empty() -> None:
    for state in (IdentityState.PENDING, IdentityState.REVOKED):
        assert dynsec.identity_acls(IdentityKind.DEVICE, "dev-a", state) == ()


def test_the_shared_enrollee_role_differs_from_the_per_device_rule_only_as_documented() -> None:
    acls = dynsec.enrollee_acls()
    rules = TopicAcl(lambda identity: None)
    own = Principal("enrollee", "dev-a", "enrollment")
    differences = {
        (action, topic)
        for topic, action in itertools.product(CORPUS, Action)
        if dynsec_allows(acls, action, topic) != rules.allows(own, action, topic)
    }
    # another device's enrollment request and response, by name; never a wildcard
    assert differences == {
        (Action.PUBLISH, topics.enroll_request("dev-b")),
        (Action.SUBSCRIBE, topics.enroll_response("dev-b")),
        (Action.RECEIVE, topics.enroll_response("dev-b")),
    }


def test_the_bridge_role_carries_enrollment_requests_out_and_answers_in_only() -> None:
    acls = dynsec.bridge_acls()
    allowed = {
        (action, topic)
        for topic, action in itertools.product(CORPUS, Action)
        if dynsec_allows(acls, action, topic)
    }
    devices = ("dev-a", "dev-b")
    assert allowed == {
        *((Action.PUBLISH, topics.enroll_request(name)) for name in devices),
        *((Action.RECEIVE, topics.enroll_response(name)) for name in devices),
        # the one filter the bridge subscribes with; no other, not even a narrower one
        (Action.SUBSCRIBE, "fg/v1/enroll/+/resp"),
    }


def test_the_internal_role_cannot_reach_control_topics() -> None:
    acls = dynsec.internal_acls()
    assert dynsec_allows(acls, Action.PUBLISH, "fg/v1/dev/dev-a/cmd/x")
    assert not dynsec_allows(acls, Action.PUBLISH, dynsec.CONTROL_TOPIC)
    admin = dynsec.admin_acls()
    assert dynsec_allows(admin, Action.PUBLISH, dynsec.CONTROL_TOPIC)
    assert dynsec_allows(admin, Action.SUBSCRIBE, "$SYS/broker/log/N")
    assert not dynsec_allows(admin, Action.PUBLISH, topics.telemetry("dev-a"))


def test_role_names_are_per_identity_and_kind() -> None:
    assert dynsec.role_name(IdentityKind.DEVICE, "dev-a") == "dev-dev-a"
    assert dynsec.role_name(IdentityKind.OPERATOR, "alice") == "op-alice"
    assert dynsec.role_name(IdentityKind.SERVICE, "gateway") == "svc-gateway"
    with pytest.raises(ValueError):
        dynsec.role_name(IdentityKind.DEVICE, "a/b")
    with pytest.raises(TypeError):
        dynsec.role_name("device", "dev-a")  # type: ignore[arg-type]


def test_first_enforcement_creates_with_rights_inline_and_later_ones_only_set() -> None:
    target = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.QUARANTINED)
    first = dynsec.enforce_commands(target, provisioned=False)
    # each accepted command rewrites the plugin's whole file: two, not three
    assert [c.name for c in first] == ["createRole", "createClient"]
    create_client = first[1].to_json()
    assert create_client == {
        "command": "createClient",
        "username": "dev-a",
        "roles": [{"rolename": "dev-dev-a"}],
    }
    assert "password" not in create_client  # reachable through the certificate only
    later = dynsec.enforce_commands(target, provisioned=True)
    assert [c.name for c in later] == ["modifyRole"]
    assert later[0].args["acls"] == first[0].args["acls"]  # the role was created with them
    renew = topics.renew_response("dev-a")
    acls = later[0].args["acls"]
    assert [(a["acltype"], a["topic"]) for a in acls] == [
        ("publishClientSend", "fg/v1/dev/dev-a/quarantine/#"),
        ("subscribeLiteral", renew),
        ("publishClientReceive", renew),
    ]
    assert all(a["allow"] is True and a["priority"] == 0 for a in acls)


def _answers(commands: list[dynsec.Command], *errors: str | None) -> list[dynsec.CommandResult]:
    pairs = enumerate(zip(commands, errors, strict=True))
    return [dynsec.CommandResult(c.name, i, e) for i, (c, e) in pairs]


def test_a_role_that_existed_gets_its_rights_set_afterwards() -> None:
    target = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.ACTIVE)
    first = dynsec.enforce_commands(target, provisioned=False)
    assert dynsec.follow_up(target, first, _answers(first, None, None)) == []
    assert dynsec.follow_up(target, first, _answers(first, None, "Client already exists")) == []
    [modify] = dynsec.follow_up(target, first, _answers(first, _ROLE_EXISTS, None))
    assert modify.name == "modifyRole" and modify.args["rolename"] == "dev-dev-a"
    assert modify.args["acls"] == first[0].args["acls"]
    with pytest.raises(ValueError):
        dynsec.follow_up(target, first, _answers(first[:1], None))


def test_revocation_deletes_the_client_which_kicks_it() -> None:
    target = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.REVOKED)
    commands = dynsec.enforce_commands(target, provisioned=True)
    assert [c.to_json() for c in commands] == [
        {"command": "deleteClient", "username": "dev-a"},
        {"command": "deleteRole", "rolename": "dev-dev-a"},
    ]
    assert all(c.tolerated for c in commands)  # revoking twice is not an error


def test_kick_toggles_an_empty_role_and_baseline_never_touches_the_admin() -> None:
    assert [c.to_json() for c in dynsec.kick_commands("dev-a")] == [
        {"command": "addClientRole", "username": "dev-a", "rolename": dynsec.KICK_ROLE},
        {"command": "removeClientRole", "username": "dev-a", "rolename": dynsec.KICK_ROLE},
    ]
    baseline = dynsec.baseline_commands("_fg_gateway", "pw")
    assert all(c.args.get("username") in (None, "_fg_gateway") for c in baseline)
    assert {"command": "setAnonymousGroup", "groupname": dynsec.ENROLLEE_GROUP} in [
        c.to_json() for c in baseline
    ]


def test_batches_carry_correlation_and_answers_are_matched() -> None:
    commands = [dynsec.delete_client("dev-a"), dynsec.create_role("r")]
    body = json.loads(dynsec.encode_batch(commands, "b1"))
    assert [c["correlationData"] for c in body["commands"]] == ["b1:0", "b1:1"]
    answer = json.dumps(
        {
            "responses": [
                {"command": "createRole", "correlationData": "b1:1", "error": _ROLE_EXISTS},
                {"command": "deleteClient", "correlationData": "b1:0", "error": _NO_CLIENT},
            ]
        }
    ).encode()
    response = dynsec.decode_response(answer)
    assert response.batch_id == "b1"
    results = dynsec.check_results(commands, response)  # both errors mean "already so"
    assert [r.command for r in results] == ["deleteClient", "createRole"]


def test_a_refused_command_raises_with_every_failure() -> None:
    commands = [dynsec.add_client_role("dev-a", "x"), dynsec.modify_role_acls("y", ())]
    answer = {
        "responses": [
            {"command": "addClientRole", "correlationData": "b:0", "error": "Role not found"},
            {"command": "modifyRole", "correlationData": "b:1", "error": "Role does not exist"},
        ]
    }
    with pytest.raises(MosquittoError) as caught:
        dynsec.check_results(commands, dynsec.decode_response(json.dumps(answer).encode()))
    assert caught.value.reason is MosquittoReason.COMMAND_FAILED
    assert caught.value.failures == (
        ("addClientRole dev-a", "Role not found"),
        ("modifyRole y", "Role does not exist"),
    )


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[]", b'{"responses": 3}', b'{"responses": [{"error": "x"}]}', b"\xff\xfe"],
)
def test_unreadable_answers_raise_bad_response(payload: bytes) -> None:
    with pytest.raises(MosquittoError) as caught:
        dynsec.decode_response(payload)
    assert caught.value.reason is MosquittoReason.BAD_RESPONSE


def test_answers_without_our_correlation_belong_to_someone_else() -> None:
    response = dynsec.decode_response(b'{"responses": [{"command": "listClients", "data": {}}]}')
    assert response.batch_id is None
    with pytest.raises(MosquittoError) as caught:
        dynsec.check_results([dynsec.create_role("r")], response)
    assert caught.value.reason is MosquittoReason.BAD_RESPONSE


def test_batches_split_in_order() -> None:
    commands = [dynsec.create_role(f"r{i}") for i in range(5)]
    split = dynsec.batches(commands, 2)
    assert [len(b) for b in split] == [2, 2, 1]
    assert [c for b in split for c in b] == commands
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            dynsec.batches(commands, bad)
    with pytest.raises(ValueError):
        dynsec.encode_batch([], "b")
    with pytest.raises(ValueError):
        dynsec.encode_batch(commands, "a:b")


def test_password_hash_matches_what_mosquitto_ctrl_wrote() -> None:
    # `mosquitto_ctrl dynsec init file admin s3cret` on Mosquitto 2.0.11
    salt = base64.b64decode("NM2sFQ+teusZVnkG")
    stored = dynsec.hash_password("s3cret", salt, 101)
    assert stored == {
        "password": "8r2AiHDGYE/0U9chyDTOXxnrukP8JHSpnFGzL+lka6/vLi+B65DE2O"
        "KyhIQpOURvsesMK3/6IaU/zRIo3AcSOA==",
        "salt": "NM2sFQ+teusZVnkG",
        "iterations": 101,
    }
    with pytest.raises(ValueError):
        dynsec.hash_password("", salt)
    with pytest.raises(ValueError):
        dynsec.hash_password("x", b"")
    with pytest.raises(ValueError):
        dynsec.hash_password("x", salt, 0)


def test_initial_file_holds_our_objects_and_every_identity_the_patterns_do_not_cover() -> None:
    salts = iter([b"A" * 12, b"B" * 12, b"C" * 12])
    config = dynsec.initial_config(
        admin_username="_fg_admin",
        admin_password="admin-pw",
        internal_username="_fg_gateway",
        internal_password="internal-pw",
        bridge_username="_fg_bridge",
        bridge_password="bridge-pw",
        identities=[
            Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.ACTIVE),
            Enforcement("dev-r", IdentityKind.DEVICE, IdentityState.REVOKED),
            Enforcement("dev-q", IdentityKind.DEVICE, IdentityState.QUARANTINED),
            Enforcement("dev-p", IdentityKind.DEVICE, IdentityState.PENDING),
            Enforcement("alice", IdentityKind.OPERATOR, IdentityState.ACTIVE),
        ],
        random_bytes=lambda n: next(salts),
    )
    assert config["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    # the main instance admits no anonymous client: no anonymous group, no enrollee role
    assert "anonymousGroup" not in config and config["groups"] == []
    clients = {c["username"]: c for c in config["clients"]}
    # active and pending devices are the patterns' (no certificate can name a pending one);
    # a revoked one keeps a client whose role denies everything
    assert set(clients) == {"_fg_admin", "_fg_gateway", "_fg_bridge", "dev-r", "dev-q", "alice"}
    admin = clients["_fg_admin"]
    expected = hashlib.pbkdf2_hmac("sha512", b"admin-pw", b"A" * 12, dynsec.PASSWORD_ITERATIONS)
    assert base64.b64decode(admin["password"]) == expected
    assert clients["_fg_bridge"]["roles"] == [{"rolename": dynsec.BRIDGE_ROLE}]
    for secret in ("admin-pw", "internal-pw", "bridge-pw"):
        assert secret not in json.dumps(config)
    assert "password" not in clients["dev-q"]
    roles = {r["rolename"]: r["acls"] for r in config["roles"]}
    assert {"dev-dev-q", "op-alice", dynsec.KICK_ROLE, dynsec.BRIDGE_ROLE} <= set(roles)
    assert dynsec.ENROLLEE_ROLE not in roles
    assert roles["dev-dev-r"] == [a.to_json() for a in dynsec.deny_rest()]
    assert roles[dynsec.KICK_ROLE] == []
    assert "dev-dev-a" not in roles and "dev-dev-p" not in roles


@pytest.mark.parametrize(
    "change",
    [
        {"admin_username": "fleetgate-admin"},  # a certificate CN could claim it
        {"internal_username": "gateway"},
        {"internal_username": "_fg_admin"},  # same as the admin
        {"bridge_username": "_fg_gateway"},  # same as the internal client
        {"bridge_username": "bridge"},
        {"identities": [Enforcement("d", IdentityKind.DEVICE, IdentityState.ACTIVE)] * 2},
        {"identities": [("d", "device", "active")]},
    ],
)
def test_initial_file_refuses_bad_input(change: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "admin_username": "_fg_admin",
        "admin_password": "a",
        "internal_username": "_fg_gateway",
        "internal_password": "b",
        "bridge_username": "_fg_bridge",
        "bridge_password": "c",
        **change,
    }
    with pytest.raises((ValueError, TypeError)):
        dynsec.initial_config(**arguments)  # type: ignore[arg-type]


def test_reserved_usernames_cannot_be_certificate_names() -> None:
    assert dynsec.check_reserved_username("_fg_gateway") == "_fg_gateway"
    for name in ("fleetgate-gateway", "admin", "dev-1"):
        with pytest.raises(ValueError):
            dynsec.check_reserved_username(name)
    with pytest.raises(ValueError):
        dynsec.check_reserved_username("")
    with pytest.raises(TypeError):
        dynsec.check_reserved_username(None)


def test_values_are_checked_on_construction() -> None:
    with pytest.raises(ValueError):
        Acl(AclType.PUBLISH_SEND, "fg/#/x")
    with pytest.raises(ValueError):
        Acl("publishEverything", "fg")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Acl(AclType.PUBLISH_SEND, "fg", allow="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Acl(AclType.PUBLISH_SEND, "fg", priority=True)
    with pytest.raises(ValueError):
        dynsec.Command("createRole", {"command": "deleteRole"})
    with pytest.raises(ValueError):
        Enforcement("a/b", IdentityKind.DEVICE, IdentityState.ACTIVE)
    with pytest.raises(TypeError):
        Enforcement("dev-a", "device", IdentityState.ACTIVE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Enforcement("dev-a", IdentityKind.DEVICE, "active")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dynsec.create_client("")
    with pytest.raises(ValueError):
        dynsec.set_default_acl_access({"publishEverything": True})
    with pytest.raises(TypeError):
        dynsec.set_default_acl_access({"subscribe": "no"})  # type: ignore[dict-item]


def _with_patterns(acls: tuple[Acl, ...], name: str, action: Action, topic: str) -> bool:
    """The 2.0.11 chain: a matching role ACL decides (allow or deny); no match defers to the
    acl_file patterns (an active device's own topics)."""
    if action is not Action.SUBSCRIBE and ("+" in topic or "#" in topic):
        return False
    types = {
        Action.SUBSCRIBE: {AclType.SUBSCRIBE_LITERAL, AclType.SUBSCRIBE_PATTERN},
        Action.PUBLISH: {AclType.PUBLISH_SEND},
        Action.RECEIVE: {AclType.PUBLISH_RECEIVE},
    }[action]
    for acl in sorted((a for a in acls if a.acltype in types), key=lambda a: -a.priority):
        if acl.acltype is AclType.SUBSCRIBE_LITERAL:
            matched = acl.topic == topic
        elif acl.acltype is AclType.SUBSCRIBE_PATTERN:
            matched = _sub_within(acl.topic, topic)
        else:
            matched = topics.topic_matches(acl.topic, topic)
        if matched:
            return acl.allow
    if action is Action.SUBSCRIBE:
        return True  # 2.0's acl_file grants every subscription; deliveries are checked
    active = TopicAcl(lambda identity: IdentityState.ACTIVE)
    return active.allows(Principal("device", name, "operational"), action, topic)


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        (kind, state)
        for kind, state in itertools.product(IdentityKind, IdentityState)
        if not (kind is IdentityKind.DEVICE and state is IdentityState.ACTIVE)
    ],
    ids=lambda v: str(v),
)
def test_roles_beside_the_patterns_still_allow_exactly_the_topic_acl(
    kind: IdentityKind, state: IdentityState
) -> None:
    """Every identity with a role is judged by the plugin alone: the patterns never add to a
    quarantined device's, an operator's or a revoked identity's rights."""
    name = "gateway" if kind is IdentityKind.SERVICE else "dev-a"
    if state is IdentityState.REVOKED:
        acls = dynsec.deny_rest()
    else:
        acls = dynsec.role_acls(kind, name, state, device_patterns=True)
    rules = TopicAcl(lambda identity: state if identity == name else None)
    principal = Principal(_KIND[kind], name, "operational")  # type: ignore[arg-type]
    for topic, action in itertools.product(CORPUS, Action):
        if topic.startswith("$"):
            continue  # "#" matches no $ topic; see the test above
        expected = rules.allows(principal, action, topic)
        assert _with_patterns(acls, name, action, topic) == expected, (action, topic)


def test_with_patterns_an_active_device_costs_nothing_unless_it_had_a_role() -> None:
    active = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.ACTIVE)
    assert dynsec.enforce_commands(active, provisioned=False, device_patterns=True) == []
    # released from quarantine: its role loses every ACL and the patterns apply again
    [release] = dynsec.enforce_commands(active, provisioned=True, device_patterns=True)
    assert release.to_json() == {"command": "modifyRole", "rolename": "dev-dev-a", "acls": []}
    # another gateway may have given it a role: emptied if there, harmless if not
    [unsure] = dynsec.enforce_commands(
        active, provisioned=False, device_patterns=True, certain=False
    )
    assert unsure.name == "modifyRole" and "Role not found" in unsure.tolerated
    pending = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.PENDING)
    assert dynsec.enforce_commands(pending, provisioned=False, device_patterns=True) == []


def test_with_patterns_revocation_denies_then_cuts_in_one_message() -> None:
    target = Enforcement("dev-a", IdentityKind.DEVICE, IdentityState.REVOKED)
    fresh = dynsec.enforce_commands(target, provisioned=False, device_patterns=True)
    assert [c.name for c in fresh] == [
        "createRole", "modifyRole", "createClient", "addClientRole", "removeClientRole",
    ]  # fmt: skip
    deny = [a.to_json() for a in dynsec.deny_rest()]
    assert fresh[0].args["acls"] == deny and fresh[1].args["acls"] == deny
    # the client is kept (deleting it would hand a reconnect back to the patterns)
    assert "deleteClient" not in [c.name for c in fresh]
    assert dynsec.follow_up(target, fresh, _answers(fresh, _ROLE_EXISTS, *[None] * 4)) == []
    known = dynsec.enforce_commands(target, provisioned=True, device_patterns=True)
    assert [c.name for c in known] == ["modifyRole", "addClientRole", "removeClientRole"]
