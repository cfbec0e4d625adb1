"""The admin API: operators (identities with a role) read and control the fleet over MQTT.

Gateway side: ``attach_admin(gateway)`` adds the request route, the telemetry counter and the
event relay; ``AdminService`` is the socket-free core. Operator side: ``AdminClient`` with a
``Profile`` written by ``fleetgate operator add``. The wire format is in docs/admin-api.md.
"""

from gateway.admin.attach import attach_admin
from gateway.admin.backend import AdminBackend, GatewayBackend, RegistryBackend
from gateway.admin.client import AdminClient, AdminError, ClientReason
from gateway.admin.events import EventRelay, EventView
from gateway.admin.profile import Profile, ProfileError, ProfileProblem, load_profile
from gateway.admin.roles import Role
from gateway.admin.service import AdminService
from gateway.admin.telemetry import TelemetryCounter, TelemetryRate
from gateway.admin.wire import EVENTS_TOPIC, AdminReason, request_topic, response_topic

__all__ = [
    "EVENTS_TOPIC",
    "AdminBackend",
    "AdminClient",
    "AdminError",
    "AdminReason",
    "AdminService",
    "ClientReason",
    "EventRelay",
    "EventView",
    "GatewayBackend",
    "Profile",
    "ProfileError",
    "ProfileProblem",
    "RegistryBackend",
    "Role",
    "TelemetryCounter",
    "TelemetryRate",
    "attach_admin",
    "load_profile",
    "request_topic",
    "response_topic",
]
