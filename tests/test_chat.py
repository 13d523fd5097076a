"""End-to-end tests of the chat domain of nexus.chat.v1.ChatService: channels and membership,
threaded channel messages, AI conversations and their messages, over a real channel, on SQLite
and PostgreSQL.

The generic standard-method behaviour of every resource is covered by test_standard_methods.py and
streaming by test_streams.py; these tests check the chat domain's own rules. Every test makes its
own users, channels and conversations and scopes its queries to them: the database is shared by
the whole session.
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, unique
from tests.support import (
    RichError,
    expect_error,
    mask,
    new_channel,
    new_conversation,
    new_project,
    new_user,
)

Code = grpc.StatusCode


# ------------------------------------------------------------------ helpers


def violation_fields(err: RichError) -> list[str]:
    return [v.field for v in err.violations]


def missing_id() -> str:
    return str(uuid.uuid4())


def deleted_user(c: Client) -> ipb.User:
    """A user id that no longer exists."""
    user = new_user(c)
    c.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id, force=True))
    return user


def get_channel(c: Client, channel_id: str, **kw: Any) -> cpb.Channel:
    return c.chat.GetChannel(cpb.GetChannelRequest(id=channel_id, **kw))


def list_channels(c: Client, filter_: str, **kw: Any) -> cpb.ListChannelsResponse:
    return c.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_, **kw))


def add_member(c: Client, channel_id: str, user_id: str) -> cpb.Channel:
    return c.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel_id, user_id=user_id))


def remove_member(c: Client, channel_id: str, user_id: str) -> cpb.Channel:
    return c.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=channel_id, user_id=user_id))


def create_message(c: Client, channel: cpb.Channel | str, content: str | None = None, **fields: Any) -> cpb.ChatMessage:
    channel_id = channel if isinstance(channel, str) else channel.id
    values: dict[str, Any] = {"channel_id": channel_id, "content": content if content is not None else f"message {unique()}"}
    values.update(fields)
    return c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(**values)))


def get_message(c: Client, message_id: str, **kw: Any) -> cpb.ChatMessage:
    return c.chat.GetChatMessage(cpb.GetChatMessageRequest(id=message_id, **kw))


def list_messages(c: Client, filter_: str, **kw: Any) -> cpb.ListChatMessagesResponse:
    return c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=filter_, **kw))


def update_message(c: Client, message: cpb.ChatMessage, *paths: str) -> cpb.ChatMessage:
    return c.chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=message, update_mask=mask(*paths)))


def delete_message(c: Client, message_id: str, force: bool = False) -> cpb.ChatMessage:
    return c.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=message_id, force=force))


def channel_count(c: Client, channel_id: str, show_deleted: bool = False) -> int:
    response = list_messages(c, f'channel_id = "{channel_id}"', page_size=1, show_deleted=show_deleted)
    assert len(response.chat_messages) <= 1
    return response.total_size


def ids(items: Any) -> list[str]:
    return [item.id for item in items]


def attachment(i: int = 0, **fields: Any) -> cpb.Attachment:
    values: dict[str, Any] = {
        "name": f"file-{i}.png",
        "url": f"https://files.example.com/{unique()}/file-{i}.png",
        "mime_type": "image/png",
        "size_bytes": 1000 + i,
    }
    values.update(fields)
    return cpb.Attachment(**values)


def get_conversation(c: Client, conversation_id: str) -> cpb.Conversation:
    return c.chat.GetConversation(cpb.GetConversationRequest(id=conversation_id))


def archive(c: Client, conversation_id: str) -> cpb.Conversation:
    return c.chat.ArchiveConversation(cpb.ArchiveConversationRequest(id=conversation_id))


def create_conversation_message(
    c: Client, conversation: cpb.Conversation | str, content: str | None = None, **fields: Any
) -> cpb.ConversationMessage:
    conversation_id = conversation if isinstance(conversation, str) else conversation.id
    values: dict[str, Any] = {
        "conversation_id": conversation_id,
        "sender_type": cpb.SENDER_TYPE_USER,
        "content": content if content is not None else f"question {unique()}",
    }
    values.update(fields)
    return c.chat.CreateConversationMessage(
        cpb.CreateConversationMessageRequest(conversation_message=cpb.ConversationMessage(**values))
    )


def list_conversation_messages(c: Client, filter_: str, **kw: Any) -> cpb.ListConversationMessagesResponse:
    return c.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=filter_, **kw))


def conversation_count(c: Client, conversation_id: str) -> int:
    response = list_conversation_messages(c, f'conversation_id = "{conversation_id}"', page_size=1)
    assert len(response.conversation_messages) <= 1
    return response.total_size


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


# ------------------------------------------------------------------ channels


def test_channel_in_a_missing_project_is_not_found(client: Client) -> None:
    name = f"orphan {unique()}"
    err = expect_error(Code.NOT_FOUND, new_channel, client, name=name, project_id=missing_id())
    assert err.info.metadata["field"] == "channel.project_id"
    assert err.resource is not None and err.resource.resource_type == "Project"
    assert list_channels(client, f'name = "{name}"').total_size == 0


@pytest.mark.parametrize("force", [False, True], ids=["soft_deleted", "removed"])
def test_channel_in_a_deleted_project_is_not_found(client: Client, force: bool) -> None:
    project = new_project(client)
    client.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id, force=force))
    err = expect_error(Code.NOT_FOUND, new_channel, client, project_id=project.id)
    assert err.info.metadata["field"] == "channel.project_id"
    assert err.resource is not None and err.resource.resource_name == project.id


def test_channel_with_a_missing_creator_is_not_found(client: Client) -> None:
    err = expect_error(Code.NOT_FOUND, new_channel, client, creator_id=deleted_user(client).id)
    assert err.info.metadata["field"] == "channel.creator_id"
    assert err.resource is not None and err.resource.resource_type == "User"


def test_channel_is_private_round_trips(client: Client) -> None:
    project = new_project(client)
    private = new_channel(client, project_id=project.id, is_private=True, description="secret plans")
    public = new_channel(client, project_id=project.id)
    assert private.is_private and not public.is_private
    assert private.project_id == project.id
    assert get_channel(client, private.id).is_private is True
    assert get_channel(client, public.id).is_private is False
    # and back, through an explicit mask (false is proto3's default)
    private.is_private = False
    opened = client.chat.UpdateChannel(cpb.UpdateChannelRequest(channel=private, update_mask=mask("is_private")))
    assert opened.is_private is False
    assert get_channel(client, private.id).is_private is False
    assert opened.description == "secret plans"


def test_channel_creator_is_immutable(client: Client) -> None:
    creator, other = new_user(client), new_user(client)
    channel = new_channel(client, creator_id=creator.id)
    assert channel.creator_id == creator.id
    changed = cpb.Channel(id=channel.id, creator_id=other.id, name=channel.name)
    err = expect_error(Code.INVALID_ARGUMENT, client.chat.UpdateChannel, cpb.UpdateChannelRequest(channel=changed, update_mask=mask("creator_id")))
    assert err.info.reason == "IMMUTABLE_FIELD"
    assert "update_mask" in violation_fields(err)
    # without a mask the immutable field is not among the fields an update may change
    renamed = cpb.Channel(id=channel.id, creator_id=other.id, name=f"renamed {unique()}")
    after = client.chat.UpdateChannel(cpb.UpdateChannelRequest(channel=renamed))
    assert after.name == renamed.name
    assert after.creator_id == creator.id
    assert get_channel(client, channel.id).creator_id == creator.id


def test_add_and_remove_channel_member_are_idempotent_and_move_the_etag_only_on_change(client: Client) -> None:
    channel = new_channel(client)
    assert list(channel.member_ids) == []
    alice, bob = new_user(client), new_user(client)

    with_alice = add_member(client, channel.id, alice.id)
    assert list(with_alice.member_ids) == [alice.id]
    assert with_alice.etag != channel.etag
    assert with_alice.update_time.ToDatetime() >= channel.update_time.ToDatetime()

    again = add_member(client, channel.id, alice.id)
    assert list(again.member_ids) == [alice.id]
    assert again.etag == with_alice.etag
    assert again.update_time == with_alice.update_time

    both = add_member(client, channel.id, bob.id)
    assert sorted(both.member_ids) == sorted([alice.id, bob.id])
    assert both.etag != again.etag
    assert sorted(get_channel(client, channel.id).member_ids) == sorted([alice.id, bob.id])

    without_alice = remove_member(client, channel.id, alice.id)
    assert list(without_alice.member_ids) == [bob.id]
    assert without_alice.etag != both.etag

    removed_again = remove_member(client, channel.id, alice.id)
    assert list(removed_again.member_ids) == [bob.id]
    assert removed_again.etag == without_alice.etag

    fetched = get_channel(client, channel.id)
    assert list(fetched.member_ids) == [bob.id]
    assert fetched.etag == without_alice.etag


def test_add_missing_user_as_channel_member_is_not_found(client: Client) -> None:
    channel = new_channel(client)
    for user_id in (deleted_user(client).id, missing_id()):
        err = expect_error(Code.NOT_FOUND, add_member, client, channel.id, user_id)
        assert err.info.metadata["field"] == "user_id"
        assert err.resource is not None and err.resource.resource_type == "User"
    after = get_channel(client, channel.id)
    assert list(after.member_ids) == []
    assert after.etag == channel.etag


def test_member_methods_reject_a_malformed_user_id(client: Client) -> None:
    channel = new_channel(client)
    for method in (add_member, remove_member):
        err = expect_error(Code.INVALID_ARGUMENT, method, client, channel.id, "not-a-uuid")
        assert violation_fields(err) == ["user_id"]


@pytest.mark.parametrize("method", ["AddChannelMember", "RemoveChannelMember"])
@pytest.mark.parametrize("how", ["never_existed", "soft_deleted", "removed"])
def test_member_methods_on_missing_channel_are_not_found(client: Client, method: str, how: str) -> None:
    if how == "never_existed":
        channel_id = missing_id()
    else:
        channel_id = new_channel(client).id
        client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel_id, force=how == "removed"))
    request = getattr(cpb, f"{method}Request")(channel_id=channel_id, user_id=new_user(client).id)
    err = expect_error(Code.NOT_FOUND, getattr(client.chat, method), request)
    assert err.info.metadata["field"] == "channel_id"
    assert err.resource is not None and err.resource.resource_type == "Channel"
    assert err.resource.resource_name == channel_id


def test_list_channels_filters_by_privacy_project_and_name_prefix(client: Client) -> None:
    project, other_project = new_project(client), new_project(client)
    prefix = unique("abc")
    private = new_channel(client, name=f"{prefix} private", project_id=project.id, is_private=True)
    public = new_channel(client, name=f"{prefix} public", project_id=project.id)
    elsewhere = new_channel(client, name=f"{prefix} elsewhere", project_id=other_project.id, is_private=True)
    unrelated = new_channel(client, name=f"x{prefix} not a prefix", project_id=project.id, is_private=True)

    in_project = list_channels(client, f'project_id = "{project.id}"')
    assert set(ids(in_project.channels)) == {private.id, public.id, unrelated.id}
    assert in_project.total_size == 3

    private_in_project = list_channels(client, f'is_private = true AND project_id = "{project.id}"')
    assert set(ids(private_in_project.channels)) == {private.id, unrelated.id}

    public_in_project = list_channels(client, f'is_private = false AND project_id = "{project.id}"')
    assert ids(public_in_project.channels) == [public.id]

    by_prefix = list_channels(client, f'name = "{prefix}*"')
    assert set(ids(by_prefix.channels)) == {private.id, public.id, elsewhere.id}
    assert by_prefix.total_size == 3

    private_by_prefix = list_channels(client, f'name = "{prefix}*" AND is_private = true')
    assert set(ids(private_by_prefix.channels)) == {private.id, elsewhere.id}

    # the prefix match is case-sensitive
    assert list_channels(client, f'name = "{prefix.upper()}*"').total_size == 0


def test_search_channels_finds_a_word_of_the_description(client: Client) -> None:
    word = unique("kw")
    project = new_project(client)
    hit = new_channel(client, name=f"plain {unique()}", description=f"the place to discuss {word} and other things", project_id=project.id)
    miss = new_channel(client, name=f"plain {unique()}", description="nothing to see here", project_id=project.id)
    response = client.chat.SearchChannels(cpb.SearchChannelsRequest(query=word))
    found = [r.channel.id for r in response.results]
    assert found == [hit.id]
    assert miss.id not in found
    assert response.total_size == 1
    assert response.results[0].score > 0
    # a soft-deleted channel is not found any more
    client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=hit.id))
    assert list(client.chat.SearchChannels(cpb.SearchChannelsRequest(query=word)).results) == []


# ------------------------------------------------------------------ chat messages


@pytest.mark.parametrize("how", ["never_existed", "soft_deleted", "removed"])
def test_message_in_a_missing_channel_is_not_found(client: Client, how: str) -> None:
    if how == "never_existed":
        channel_id = missing_id()
    else:
        channel_id = new_channel(client).id
        client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel_id, force=how == "removed"))
    content = f"lost {unique()}"
    err = expect_error(Code.NOT_FOUND, create_message, client, channel_id, content)
    assert err.info.metadata["field"] == "chat_message.channel_id"
    assert err.resource is not None and err.resource.resource_type == "Channel"
    assert err.resource.resource_name == channel_id
    assert list_messages(client, f'content = "{content}"', show_deleted=True).total_size == 0


def test_replies_form_a_thread_listed_in_order(client: Client) -> None:
    channel = new_channel(client)
    parent = create_message(client, channel, "what do we ship on friday?")
    assert parent.parent_id == ""
    replies = [create_message(client, channel, f"reply {i}", parent_id=parent.id) for i in range(4)]
    create_message(client, channel, "not in the thread")
    for reply in replies:
        assert reply.parent_id == parent.id
        assert reply.channel_id == channel.id
        assert get_message(client, reply.id).parent_id == parent.id

    thread = list_messages(client, f'parent_id = "{parent.id}"')
    assert ids(thread.chat_messages) == ids(replies)
    assert [m.content for m in thread.chat_messages] == [f"reply {i}" for i in range(4)]
    assert thread.total_size == 4

    # a reply to a reply is a thread of its own
    nested = create_message(client, channel, "nested", parent_id=replies[0].id)
    assert ids(list_messages(client, f'parent_id = "{replies[0].id}"').chat_messages) == [nested.id]
    assert list_messages(client, f'parent_id = "{parent.id}"').total_size == 4

    # paging through the thread keeps the order
    seen: list[str] = []
    token = ""
    while True:
        page = list_messages(client, f'parent_id = "{parent.id}"', page_size=3, page_token=token)
        seen += ids(page.chat_messages)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids(replies)


def test_reply_to_a_parent_in_another_channel_is_refused(client: Client) -> None:
    home, away = new_channel(client), new_channel(client)
    parent = create_message(client, home, "the parent")
    content = f"misplaced reply {unique()}"
    err = expect_error(Code.FAILED_PRECONDITION, create_message, client, away, content, parent_id=parent.id)
    assert err.info.reason == "PARENT_IN_OTHER_CHANNEL"
    assert err.info.metadata["field"] == "chat_message.parent_id"
    assert channel_count(client, away.id, show_deleted=True) == 0
    assert list_messages(client, f'parent_id = "{parent.id}"', show_deleted=True).total_size == 0
    assert list_messages(client, f'content = "{content}"', show_deleted=True).total_size == 0


def test_reply_to_a_missing_parent_is_not_found(client: Client) -> None:
    channel = new_channel(client)
    removed = create_message(client, channel)
    delete_message(client, removed.id, force=True)
    for parent_id in (missing_id(), removed.id):
        err = expect_error(Code.NOT_FOUND, create_message, client, channel, "orphan reply", parent_id=parent_id)
        assert err.info.metadata["field"] == "chat_message.parent_id"
        assert err.resource is not None and err.resource.resource_type == "ChatMessage"
        assert err.resource.resource_name == parent_id
    assert channel_count(client, channel.id, show_deleted=True) == 0


def test_editing_content_sets_edited_time_and_moves_update_time(client: Client) -> None:
    channel = new_channel(client)
    created = create_message(client, channel, "first draft", edited_time={"seconds": 1_000_000})
    assert not created.HasField("edited_time"), "edited_time is output only and unset at creation"
    assert not get_message(client, created.id).HasField("edited_time")

    created.content = "second draft"
    edited = update_message(client, created, "content")
    assert edited.content == "second draft"
    assert edited.HasField("edited_time")
    assert edited.update_time.ToDatetime() > created.update_time.ToDatetime()
    assert edited.edited_time.ToDatetime() >= created.create_time.ToDatetime()
    assert edited.create_time == created.create_time
    assert edited.etag != created.etag
    fetched = get_message(client, created.id)
    assert fetched.edited_time == edited.edited_time
    assert fetched.content == "second draft"

    # a later edit moves it again
    edited.content = "third draft"
    edited_again = update_message(client, edited, "content")
    assert edited_again.edited_time.ToDatetime() > edited.edited_time.ToDatetime()
    assert edited_again.update_time.ToDatetime() > edited.update_time.ToDatetime()


def test_editing_attachments_sets_edited_time(client: Client) -> None:
    channel = new_channel(client)
    created = create_message(client, channel, "see attached")
    assert not created.HasField("edited_time")
    changed = cpb.ChatMessage(id=created.id, attachments=[attachment(1)])
    edited = update_message(client, changed, "attachments")
    assert edited.HasField("edited_time")
    assert edited.content == "see attached"
    assert len(edited.attachments) == 1
    assert edited.update_time.ToDatetime() > created.update_time.ToDatetime()

    # removing every attachment is an edit too
    cleared = update_message(client, cpb.ChatMessage(id=created.id), "attachments")
    assert list(cleared.attachments) == []
    assert cleared.edited_time.ToDatetime() > edited.edited_time.ToDatetime()


def test_soft_deleting_a_parent_keeps_its_thread(client: Client) -> None:
    channel = new_channel(client)
    parent = create_message(client, channel, "parent to be deleted")
    replies = [create_message(client, channel, f"reply {i}", parent_id=parent.id) for i in range(3)]

    deleted = delete_message(client, parent.id)
    assert deleted.HasField("delete_time")

    thread = list_messages(client, f'parent_id = "{parent.id}"')
    assert ids(thread.chat_messages) == ids(replies)
    assert all(m.parent_id == parent.id for m in thread.chat_messages)
    for reply in replies:
        fetched = get_message(client, reply.id)
        assert fetched.parent_id == parent.id
        assert not fetched.HasField("delete_time")

    err = expect_error(Code.NOT_FOUND, get_message, client, parent.id)
    assert err.resource is not None and err.resource.resource_type == "ChatMessage"
    shown = get_message(client, parent.id, show_deleted=True)
    assert shown.HasField("delete_time")
    assert shown.content == "parent to be deleted"

    # the parent is gone from the channel's list, not from show_deleted
    listed = list_messages(client, f'channel_id = "{channel.id}"')
    assert ids(listed.chat_messages) == ids(replies)
    assert parent.id in ids(list_messages(client, f'channel_id = "{channel.id}"', show_deleted=True).chat_messages)

    restored = client.chat.UndeleteChatMessage(cpb.UndeleteChatMessageRequest(id=parent.id))
    assert not restored.HasField("delete_time")
    assert not get_message(client, parent.id).HasField("delete_time")
    assert ids(list_messages(client, f'channel_id = "{channel.id}"').chat_messages) == [parent.id] + ids(replies)
    assert ids(list_messages(client, f'parent_id = "{parent.id}"').chat_messages) == ids(replies)


def test_force_deleting_a_parent_removes_its_replies(client: Client) -> None:
    channel = new_channel(client)
    parent = create_message(client, channel, "parent to be removed")
    replies = [create_message(client, channel, f"reply {i}", parent_id=parent.id) for i in range(2)]
    grandchild = create_message(client, channel, "reply to a reply", parent_id=replies[0].id)
    soft_deleted_reply = create_message(client, channel, "a soft-deleted reply", parent_id=parent.id)
    delete_message(client, soft_deleted_reply.id)
    bystander = create_message(client, channel, "not in the thread")

    last_state = delete_message(client, parent.id, force=True)
    assert last_state.id == parent.id

    for gone in [parent, *replies, grandchild, soft_deleted_reply]:
        expect_error(Code.NOT_FOUND, get_message, client, gone.id, show_deleted=True)
    assert list_messages(client, f'parent_id = "{parent.id}"', show_deleted=True).total_size == 0
    assert ids(list_messages(client, f'channel_id = "{channel.id}"', show_deleted=True).chat_messages) == [bystander.id]
    assert get_message(client, bystander.id).content == "not in the thread"


def test_attachments_round_trip_with_all_their_fields(client: Client) -> None:
    channel = new_channel(client)
    files = [
        cpb.Attachment(name="diagram.png", url="https://files.example.com/d/diagram.png", mime_type="image/png", size_bytes=48_213),
        cpb.Attachment(name="Bericht über Ärger.pdf", url="https://files.example.com/r/b%C3%A9.pdf", mime_type="application/pdf", size_bytes=5_000_000_000),
        cpb.Attachment(name="empty.txt", url="https://files.example.com/e/empty.txt", mime_type="text/plain", size_bytes=0),
        cpb.Attachment(name="huge.bin", url="https://files.example.com/h/huge.bin", mime_type="application/octet-stream", size_bytes=2**63 - 1),
    ]
    created = create_message(client, channel, "files", attachments=files)
    assert list(created.attachments) == files
    fetched = get_message(client, created.id)
    assert list(fetched.attachments) == files
    for a, b in zip(fetched.attachments, files, strict=True):
        assert (a.name, a.url, a.mime_type, a.size_bytes) == (b.name, b.url, b.mime_type, b.size_bytes)
    listed = list_messages(client, f'channel_id = "{channel.id}"')
    assert list(listed.chat_messages[0].attachments) == files


def test_at_most_fifty_attachments(client: Client) -> None:
    channel = new_channel(client)
    fifty = create_message(client, channel, "fifty", attachments=[attachment(i) for i in range(50)])
    assert len(get_message(client, fifty.id).attachments) == 50

    err = expect_error(Code.INVALID_ARGUMENT, create_message, client, channel, "fifty-one", attachments=[attachment(i) for i in range(51)])
    assert violation_fields(err) == ["chat_message.attachments"]
    assert channel_count(client, channel.id, show_deleted=True) == 1

    too_many = cpb.ChatMessage(id=fifty.id, attachments=[attachment(i) for i in range(51)])
    err = expect_error(Code.INVALID_ARGUMENT, update_message, client, too_many, "attachments")
    assert violation_fields(err) == ["chat_message.attachments"]
    after = get_message(client, fifty.id)
    assert len(after.attachments) == 50
    assert after.etag == fifty.etag
    assert not after.HasField("edited_time")


@pytest.mark.parametrize("field", ["channel_id", "author_id", "parent_id"])
def test_message_placement_fields_are_immutable(client: Client, field: str) -> None:
    channel, other_channel = new_channel(client), new_channel(client)
    author, other_author = new_user(client), new_user(client)
    parent = create_message(client, channel, "parent")
    other_parent = create_message(client, channel, "other parent")
    message = create_message(client, channel, "reply", author_id=author.id, parent_id=parent.id)
    new_values = {"channel_id": other_channel.id, "author_id": other_author.id, "parent_id": other_parent.id}
    changed = cpb.ChatMessage(id=message.id, **{field: new_values[field]})
    err = expect_error(Code.INVALID_ARGUMENT, update_message, client, changed, field)
    assert err.info.reason == "IMMUTABLE_FIELD"
    assert violation_fields(err) == ["update_mask"]
    after = get_message(client, message.id)
    assert (after.channel_id, after.author_id, after.parent_id) == (channel.id, author.id, parent.id)
    assert after.etag == message.etag


def test_message_counts_per_channel(client: Client) -> None:
    busy, quiet, empty = new_channel(client), new_channel(client), new_channel(client)
    busy_messages = [create_message(client, busy) for _ in range(5)]
    create_message(client, quiet)
    create_message(client, quiet, parent_id=create_message(client, quiet).id)
    assert channel_count(client, busy.id) == 5
    assert channel_count(client, quiet.id) == 3
    assert channel_count(client, empty.id) == 0

    delete_message(client, busy_messages[1].id)
    delete_message(client, busy_messages[3].id)
    assert channel_count(client, busy.id) == 3
    assert channel_count(client, busy.id, show_deleted=True) == 5
    delete_message(client, busy_messages[3].id, force=True)
    assert channel_count(client, busy.id, show_deleted=True) == 4
    assert channel_count(client, busy.id) == 3


def test_content_substring_filter(client: Client) -> None:
    channel = new_channel(client)
    word = unique("sub")
    inside = create_message(client, channel, f"prefix{word}suffix")
    shouting = create_message(client, channel, f"SAY {word.upper()} LOUDLY")
    create_message(client, channel, "unrelated text")
    hits = list_messages(client, f'channel_id = "{channel.id}" AND content:"{word}"')
    assert set(ids(hits.chat_messages)) == {inside.id, shouting.id}
    assert hits.total_size == 2
    # the equality test is exact
    assert list_messages(client, f'channel_id = "{channel.id}" AND content = "{word}"').total_size == 0


def test_search_chat_messages_ranks_the_better_match_first(client: Client) -> None:
    channel = new_channel(client)
    word = unique("zq")
    once = create_message(client, channel, f"alpha {word} gamma delta")
    twice = create_message(client, channel, f"alpha {word} {word} delta")
    miss = create_message(client, channel, "alpha beta gamma delta")
    response = client.chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=word, filter=f'channel_id = "{channel.id}"'))
    found = [r.chat_message.id for r in response.results]
    assert found[0] == twice.id
    assert set(found) == {once.id, twice.id}
    assert miss.id not in found
    assert response.total_size == 2
    assert response.results[0].score >= response.results[1].score
    # soft-deleted messages are not found
    delete_message(client, twice.id)
    response = client.chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=word, filter=f'channel_id = "{channel.id}"'))
    assert [r.chat_message.id for r in response.results] == [once.id]


def test_messages_order_by_create_time(client: Client) -> None:
    channel = new_channel(client)
    messages = [create_message(client, channel, f"m{i}") for i in range(5)]
    ascending = list_messages(client, f'channel_id = "{channel.id}"')
    assert ids(ascending.chat_messages) == ids(messages)
    descending = list_messages(client, f'channel_id = "{channel.id}"', order_by="create_time desc")
    assert ids(descending.chat_messages) == ids(reversed(messages))
    times = [m.create_time.ToDatetime() for m in descending.chat_messages]
    assert times == sorted(times, reverse=True)


# ------------------------------------------------------------------ conversations


def test_conversation_user_must_exist_when_named(client: Client) -> None:
    """Left unset by an admin acting for no user, user_id makes a conversation without a user
    (tests/test_ownerless_conversations.py); named, it must be a live user."""
    title = f"nobody's {unique()}"
    for user_id in (missing_id(), deleted_user(client).id):
        err = expect_error(Code.NOT_FOUND, new_conversation, client, title=title, user_id=user_id)
        assert err.info.metadata["field"] == "conversation.user_id"
        assert err.resource is not None and err.resource.resource_type == "User"
    assert client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'title = "{title}"')).total_size == 0


def test_conversation_status_defaults_to_active(client: Client) -> None:
    conversation = new_conversation(client)
    assert conversation.status == cpb.CONVERSATION_STATUS_ACTIVE
    assert get_conversation(client, conversation.id).status == cpb.CONVERSATION_STATUS_ACTIVE


def test_archive_conversation_is_idempotent(client: Client) -> None:
    conversation = new_conversation(client)
    archived = archive(client, conversation.id)
    assert archived.status == cpb.CONVERSATION_STATUS_ARCHIVED
    assert archived.etag != conversation.etag
    assert archived.title == conversation.title and archived.user_id == conversation.user_id
    again = archive(client, conversation.id)
    assert again.status == cpb.CONVERSATION_STATUS_ARCHIVED
    assert again.etag == archived.etag
    assert again.update_time == archived.update_time
    fetched = get_conversation(client, conversation.id)
    assert fetched.status == cpb.CONVERSATION_STATUS_ARCHIVED
    assert fetched.etag == archived.etag


def test_archive_missing_conversation_is_not_found(client: Client) -> None:
    conversation_id = missing_id()
    err = expect_error(Code.NOT_FOUND, archive, client, conversation_id)
    assert err.resource is not None and err.resource.resource_type == "Conversation"
    assert err.resource.resource_name == conversation_id


def test_no_new_messages_in_an_archived_conversation(client: Client) -> None:
    conversation = new_conversation(client)
    create_conversation_message(client, conversation, "before archiving")
    archive(client, conversation.id)
    content = f"too late {unique()}"
    err = expect_error(Code.FAILED_PRECONDITION, create_conversation_message, client, conversation, content)
    assert err.info.reason == "CONVERSATION_ARCHIVED"
    assert conversation_count(client, conversation.id) == 1
    assert list_conversation_messages(client, f'content = "{content}"').total_size == 0
    # the archived conversation is still readable
    assert [m.content for m in list_conversation_messages(client, f'conversation_id = "{conversation.id}"').conversation_messages] == ["before archiving"]


def test_status_archived_through_update_also_blocks_new_messages(client: Client) -> None:
    conversation = new_conversation(client)
    closed = client.chat.UpdateConversation(
        cpb.UpdateConversationRequest(
            conversation=cpb.Conversation(id=conversation.id, status=cpb.CONVERSATION_STATUS_ARCHIVED), update_mask=mask("status")
        )
    )
    assert closed.status == cpb.CONVERSATION_STATUS_ARCHIVED
    err = expect_error(Code.FAILED_PRECONDITION, create_conversation_message, client, conversation)
    assert err.info.reason == "CONVERSATION_ARCHIVED"
    assert err.info.metadata["conversation_id"] == conversation.id
    assert conversation_count(client, conversation.id) == 0
    # ArchiveConversation on it changes nothing
    assert archive(client, conversation.id).etag == closed.etag


def test_list_conversations_by_user_and_status(client: Client) -> None:
    user, other = new_user(client), new_user(client)
    active = [new_conversation(client, user_id=user.id) for _ in range(2)]
    archived = new_conversation(client, user_id=user.id)
    archive(client, archived.id)
    new_conversation(client, user_id=other.id)

    response = client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'user_id = "{user.id}" AND status = ACTIVE'))
    assert ids(response.conversations) == ids(active)
    assert response.total_size == 2
    response = client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'user_id = "{user.id}" AND status = CONVERSATION_STATUS_ARCHIVED'))
    assert ids(response.conversations) == [archived.id]
    assert client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'user_id = "{user.id}"')).total_size == 3


def test_deleting_a_conversation_removes_its_messages(client: Client) -> None:
    conversation, kept = new_conversation(client), new_conversation(client)
    messages = [create_conversation_message(client, conversation) for _ in range(3)]
    survivor = create_conversation_message(client, kept)
    client.chat.DeleteConversation(cpb.DeleteConversationRequest(id=conversation.id))
    expect_error(Code.NOT_FOUND, get_conversation, client, conversation.id)
    for message in messages:
        err = expect_error(Code.NOT_FOUND, client.chat.GetConversationMessage, cpb.GetConversationMessageRequest(id=message.id))
        assert err.resource is not None and err.resource.resource_type == "ConversationMessage"
    assert conversation_count(client, conversation.id) == 0
    assert client.chat.GetConversationMessage(cpb.GetConversationMessageRequest(id=survivor.id)).id == survivor.id
    # and the id is free of messages for good: a new message there is NOT_FOUND
    err = expect_error(Code.NOT_FOUND, create_conversation_message, client, conversation)
    assert err.info.metadata["field"] == "conversation_message.conversation_id"


# ------------------------------------------------------------------ conversation messages


def test_conversation_message_sender_type_is_required_and_known(client: Client) -> None:
    conversation = new_conversation(client)
    err = expect_error(Code.INVALID_ARGUMENT, create_conversation_message, client, conversation, sender_type=cpb.SENDER_TYPE_UNSPECIFIED)
    assert "conversation_message.sender_type" in violation_fields(err)
    assert err.info.reason == "REQUIRED_FIELD"
    err = expect_error(Code.INVALID_ARGUMENT, create_conversation_message, client, conversation, sender_type=99)
    assert violation_fields(err) == ["conversation_message.sender_type"]
    assert conversation_count(client, conversation.id) == 0

    for sender in (cpb.SENDER_TYPE_USER, cpb.SENDER_TYPE_ASSISTANT, cpb.SENDER_TYPE_SYSTEM):
        message = create_conversation_message(client, conversation, sender_type=sender)
        assert message.sender_type == sender
        assert client.chat.GetConversationMessage(cpb.GetConversationMessageRequest(id=message.id)).sender_type == sender


def test_conversation_message_in_missing_conversation_is_not_found(client: Client) -> None:
    err = expect_error(Code.NOT_FOUND, create_conversation_message, client, missing_id())
    assert err.info.metadata["field"] == "conversation_message.conversation_id"
    assert err.resource is not None and err.resource.resource_type == "Conversation"


def test_role_metadata_round_trips_nested_values(client: Client) -> None:
    conversation = new_conversation(client)
    metadata = {
        "tokens": 1234,
        "temperature": 0.25,
        "negative": -7.5,
        "streamed": True,
        "truncated": False,
        "stop_reason": None,
        "model": "nexus-large",
        "empty_list": [],
        "empty_object": {},
        "tool_calls": [
            {"name": "search", "arguments": {"query": "größe", "limit": 5, "filters": {"lang": ["de", "en"]}}},
            {"name": "noop", "arguments": {}, "result": None},
        ],
        "chunks": [1, "two", 3.5, True, None, [4, [5]], {"six": 6}],
    }
    message = create_conversation_message(client, conversation, sender_type=cpb.SENDER_TYPE_ASSISTANT, role_metadata=struct(metadata))
    expected = struct(metadata)
    assert message.role_metadata == expected
    fetched = client.chat.GetConversationMessage(cpb.GetConversationMessageRequest(id=message.id))
    assert fetched.role_metadata == expected
    listed = list_conversation_messages(client, f'conversation_id = "{conversation.id}"')
    assert listed.conversation_messages[0].role_metadata == expected
    # kinds survive: null stays null, bools stay bools, lists stay lists
    fields = fetched.role_metadata.fields
    assert fields["stop_reason"].WhichOneof("kind") == "null_value"
    assert fields["streamed"].WhichOneof("kind") == "bool_value"
    assert fields["truncated"].WhichOneof("kind") == "bool_value" and fields["truncated"].bool_value is False
    assert fields["tokens"].number_value == 1234
    assert fields["empty_list"].WhichOneof("kind") == "list_value"
    assert fields["tool_calls"].list_value.values[0].struct_value.fields["arguments"].struct_value.fields["filters"].struct_value.fields["lang"].list_value.values[1].string_value == "en"


def test_filter_conversation_messages_by_metadata_and_sender(client: Client) -> None:
    conversation = new_conversation(client)
    scope = f'conversation_id = "{conversation.id}"'

    def say(sender: int, tokens: Any) -> cpb.ConversationMessage:
        meta = None if tokens is ... else struct({"tokens": tokens})
        return create_conversation_message(client, conversation, sender_type=sender, role_metadata=meta)

    small = say(cpb.SENDER_TYPE_USER, 5)
    edge = say(cpb.SENDER_TYPE_USER, 10)
    big_user = say(cpb.SENDER_TYPE_USER, 11)
    big_assistant = say(cpb.SENDER_TYPE_ASSISTANT, 250)
    fractional = say(cpb.SENDER_TYPE_ASSISTANT, 10.5)
    nine = say(cpb.SENDER_TYPE_ASSISTANT, 9)
    as_text = say(cpb.SENDER_TYPE_ASSISTANT, "20")
    no_metadata = say(cpb.SENDER_TYPE_SYSTEM, ...)

    more_than_ten = list_conversation_messages(client, f"{scope} AND role_metadata.tokens > 10")
    assert ids(more_than_ten.conversation_messages) == [big_user.id, big_assistant.id, fractional.id]
    assert more_than_ten.total_size == 3

    at_most_ten = list_conversation_messages(client, f"{scope} AND role_metadata.tokens <= 10")
    assert ids(at_most_ten.conversation_messages) == [small.id, edge.id, nine.id]

    assistant = list_conversation_messages(client, f"{scope} AND sender_type = ASSISTANT")
    assert ids(assistant.conversation_messages) == [big_assistant.id, fractional.id, nine.id, as_text.id]

    both = list_conversation_messages(client, f"{scope} AND sender_type = ASSISTANT AND role_metadata.tokens > 10")
    assert ids(both.conversation_messages) == [big_assistant.id, fractional.id]

    system = list_conversation_messages(client, f"{scope} AND sender_type = SENDER_TYPE_SYSTEM")
    assert ids(system.conversation_messages) == [no_metadata.id]


def test_conversation_message_count(client: Client) -> None:
    busy, quiet, empty = new_conversation(client), new_conversation(client), new_conversation(client)
    busy_messages = [create_conversation_message(client, busy) for _ in range(4)]
    create_conversation_message(client, quiet)
    assert conversation_count(client, busy.id) == 4
    assert conversation_count(client, quiet.id) == 1
    assert conversation_count(client, empty.id) == 0
    client.chat.DeleteConversationMessage(cpb.DeleteConversationMessageRequest(id=busy_messages[0].id))
    assert conversation_count(client, busy.id) == 3


def test_conversation_messages_order_by_create_time_is_insertion_order(client: Client) -> None:
    conversation = new_conversation(client)
    senders = [cpb.SENDER_TYPE_SYSTEM, cpb.SENDER_TYPE_USER, cpb.SENDER_TYPE_ASSISTANT, cpb.SENDER_TYPE_USER, cpb.SENDER_TYPE_ASSISTANT, cpb.SENDER_TYPE_USER]
    messages = [create_conversation_message(client, conversation, f"turn {i}", sender_type=s) for i, s in enumerate(senders)]
    scope = f'conversation_id = "{conversation.id}"'
    default = list_conversation_messages(client, scope)
    assert ids(default.conversation_messages) == ids(messages)
    explicit = list_conversation_messages(client, scope, order_by="create_time")
    assert ids(explicit.conversation_messages) == ids(messages)
    descending = list_conversation_messages(client, scope, order_by="create_time desc")
    assert ids(descending.conversation_messages) == ids(reversed(messages))
    assert [m.content for m in default.conversation_messages] == [f"turn {i}" for i in range(len(senders))]
    times = [m.create_time.ToDatetime() for m in default.conversation_messages]
    assert times == sorted(times)


# ------------------------------------------------------------------ rules under concurrent writes


@contextlib.contextmanager
def create_paused_after_its_checks(c: Client, resource_type: str, request_id: str) -> Iterator[Callable[[int], None]]:
    """PostgreSQL only: a Create with `request_id` runs its checks, then waits before inserting.

    Another connection inserts the request_id's record in a transaction it keeps open: the
    service's own insert of that record (made after the domain checks, before the resource row)
    waits on the unique index until this context ends, when the open transaction rolls back
    and the Create goes on. Yields `wait_for_lock_waiters(n)`: returns once n sessions of the
    database wait on a lock (AssertionError after 10 s).
    """
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from db.base import utcnow
    from db.domains.identity import ApiKey
    from db.engine.tables import RequestRecord

    engine = sa.create_engine(c.database_url, poolclass=NullPool)
    try:
        with engine.connect() as holder, engine.connect() as probe:
            # The record is the caller's own (its principal): the client's API key.
            key_id = probe.execute(
                sa.select(ApiKey.id).where(ApiKey.key_prefix == c.admin_secret.split(".", 1)[0])
            ).scalar_one()
            probe.rollback()
            tx = holder.begin()
            holder.execute(
                RequestRecord.__table__.insert().values(
                    id=uuid.uuid4(), resource_type=resource_type, principal=f"api_key:{key_id}", request_id=request_id,
                    resource_id=uuid.uuid4(), create_time=utcnow(),
                )
            )

            def lock_waiters() -> int:
                count = probe.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
                ).scalar_one()
                probe.rollback()  # pg_stat_activity is a snapshot per transaction
                return int(count)

            def wait_for_lock_waiters(n: int, unless: Callable[[], bool] = lambda: False) -> None:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if unless() or lock_waiters() >= n:
                        return
                    time.sleep(0.01)
                raise AssertionError(f"expected {n} sessions waiting on a lock")

            try:
                yield wait_for_lock_waiters
            finally:
                tx.rollback()
    finally:
        engine.dispose()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a thread; the dict gets "result" or "error"."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except grpc.RpcError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# PostgreSQL only: SQLite serializes write transactions (BEGIN IMMEDIATE), so the interleaving cannot happen there.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_archive_racing_a_new_message_never_leaves_a_message_after_the_archive(client: Client) -> None:
    """A message whose create checked the status just before a concurrent archive committed
    must either be refused (CONVERSATION_ARCHIVED) or be stored before the archive: never after.
    """
    conversation = new_conversation(client)
    request_id = unique("race")
    content = f"racing message {unique()}"
    request = cpb.CreateConversationMessageRequest(
        request_id=request_id,
        conversation_message=cpb.ConversationMessage(conversation_id=conversation.id, sender_type=cpb.SENDER_TYPE_USER, content=content),
    )
    with create_paused_after_its_checks(client, "ConversationMessage", request_id) as wait_for_lock_waiters:
        creator, created = in_thread(lambda: client.chat.CreateConversationMessage(request, timeout=30))
        wait_for_lock_waiters(1)  # the create has checked the conversation's status (active) and waits
        archiver, archived = in_thread(lambda: archive(client, conversation.id))
        # the archive either commits at once or waits for the create (which holds the conversation)
        wait_for_lock_waiters(2, unless=lambda: not archiver.is_alive())
    creator.join(30)
    archiver.join(30)
    assert not creator.is_alive() and not archiver.is_alive()
    assert "error" not in archived, archived.get("error")
    archive_time = archived["result"].update_time.ToDatetime()
    assert archived["result"].status == cpb.CONVERSATION_STATUS_ARCHIVED

    stored = list_conversation_messages(client, f'conversation_id = "{conversation.id}"').conversation_messages
    if "error" in created:
        assert created["error"].code() == Code.FAILED_PRECONDITION
        assert [m.content for m in stored] == []
    else:
        assert [m.content for m in stored] == [content]
        assert stored[0].create_time.ToDatetime() < archive_time, (
            f"message created at {stored[0].create_time.ToDatetime()} in a conversation archived at {archive_time}"
        )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_channel_soft_delete_racing_a_new_message_never_leaves_a_message_after_the_delete(client: Client) -> None:
    """Same race for the reference check: a message must not land in a channel already soft-deleted."""
    channel = new_channel(client)
    request_id = unique("race")
    content = f"racing message {unique()}"
    request = cpb.CreateChatMessageRequest(request_id=request_id, chat_message=cpb.ChatMessage(channel_id=channel.id, content=content))
    with create_paused_after_its_checks(client, "ChatMessage", request_id) as wait_for_lock_waiters:
        creator, created = in_thread(lambda: client.chat.CreateChatMessage(request, timeout=30))
        wait_for_lock_waiters(1)  # the create has checked that the channel exists, and waits
        deleter, deleted = in_thread(lambda: client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel.id)))
        wait_for_lock_waiters(2, unless=lambda: not deleter.is_alive())
    creator.join(30)
    deleter.join(30)
    assert not creator.is_alive() and not deleter.is_alive()
    assert "error" not in deleted, deleted.get("error")
    delete_time = deleted["result"].delete_time.ToDatetime()

    stored = list_messages(client, f'channel_id = "{channel.id}"', show_deleted=True).chat_messages
    if "error" in created:
        assert created["error"].code() == Code.NOT_FOUND
        assert list(stored) == []
    else:
        assert [m.content for m in stored] == [content]
        assert stored[0].create_time.ToDatetime() < delete_time, (
            f"message created at {stored[0].create_time.ToDatetime()} in a channel soft-deleted at {delete_time}"
        )


def test_concurrent_member_changes_are_all_applied_once(client: Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    channel = new_channel(client)
    users = [new_user(client) for _ in range(4)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda u: add_member(client, channel.id, u.id), users * 2))
    assert all(set(r.member_ids) <= {u.id for u in users} for r in results)
    final = get_channel(client, channel.id)
    assert sorted(final.member_ids) == sorted(u.id for u in users)
    assert add_member(client, channel.id, users[0].id).etag == final.etag
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: remove_member(client, channel.id, u.id), users[:2] * 2))
    final = get_channel(client, channel.id)
    assert sorted(final.member_ids) == sorted(u.id for u in users[2:])
    assert remove_member(client, channel.id, users[0].id).etag == final.etag
