"""The gateway side of enrollment: a sans-I/O core that turns requests into answers.

``EnrollmentService.handle(topic, payload) -> [Publish]`` is all the transport needs; operators'
tools call ``approve`` and ``create_token``.
"""

from gateway.enrollment.errors import EnrollmentRejected
from gateway.enrollment.policy import ApprovalRule, EnrollmentPolicy
from gateway.enrollment.publish import Publish
from gateway.enrollment.service import EnrollmentService
from gateway.enrollment.timing import renew_after
from gateway.enrollment.tokens import token_hash

__all__ = [
    "ApprovalRule",
    "EnrollmentPolicy",
    "EnrollmentRejected",
    "EnrollmentService",
    "Publish",
    "renew_after",
    "token_hash",
]
