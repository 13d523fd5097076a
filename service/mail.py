"""nexus.mail.v1.MailService: emails, their drafts and their sending."""
from __future__ import annotations

from typing import Any

import grpc
from nexus.mail.v1 import mail_pb2 as pb
from nexus.mail.v1 import mail_pb2_grpc

from db.domains import mail
from service.rpc import DomainServicer


class MailService(DomainServicer, mail_pb2_grpc.MailServiceServicer):
    resources = (mail.EMAILS,)
    service_descriptor = pb.DESCRIPTOR.services_by_name["MailService"]

    async def SendEmail(self, request: pb.SendEmailRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: mail.send_email(s, request, call), resource_type="Email")
