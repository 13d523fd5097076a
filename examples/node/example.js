// The README's flow against a running Nexus Data Service, from Node (@grpc/grpc-js, with the
// protos loaded at run time by @grpc/proto-loader: no generated code):
//
//  1. create a user, a project (twice with one request_id: the same project) and five tasks
//  2. list the project's tasks two by two, following next_page_token to the end
//  3. update a task with the etag it was read with, then again with that (now stale) etag:
//     ABORTED; the google.rpc.Status in the `grpc-status-details-bin` trailer is decoded and
//     its details printed (ErrorInfo reason ETAG_MISMATCH, ...); and a Get of an id that is no
//     UUID: INVALID_ARGUMENT with a BadRequest naming the field
//  4. follow a channel with StreamEvents, read three messages' events, disconnect, post two
//     more, reconnect with the last event's resume_token and get exactly the two it missed
//
// Environment: NEXUS_API_KEY (an admin key: required), NEXUS_ADDRESS (default localhost:50051),
// NEXUS_PROTOS (default: the repository's protos/). Exits 1 on any unexpected answer.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');

const CALL_TIMEOUT_MS = 15000;
const PROTOS = process.env.NEXUS_PROTOS || path.join(__dirname, '..', '..', 'protos');

// The options every Nexus client in Node should load the protos with: field names as in the
// protos (snake_case), 64-bit integers and enums as strings, defaults for unset fields, and a
// virtual field naming the member a oneof holds (StreamEventsResponse.resource).
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS] };

const definition = protoLoader.loadSync(
  ['nexus/identity/v1/identity.proto', 'nexus/work/v1/work.proto', 'nexus/chat/v1/chat.proto'],
  LOADER_OPTIONS,
);
const nexus = grpc.loadPackageDefinition(definition).nexus;

// google.rpc.Status and its detail messages (ErrorInfo, BadRequest, ResourceInfo, ...), from the
// google-proto-files package, to decode `grpc-status-details-bin`; field names kept as in the
// protos (field_violations), as the loader's keepCase does for the Nexus messages.
const rpcTypes = new protobuf.Root().loadSync(
  [googleProtoFiles.getProtoPath('rpc', 'status.proto'), googleProtoFiles.getProtoPath('rpc', 'error_details.proto')],
  { keepCase: true },
);
const Status = rpcTypes.lookupType('google.rpc.Status');
const AS_OBJECT = { longs: String, enums: String, defaults: true };

class Failure extends Error {}

function expect(condition, message) {
  if (!condition) throw new Failure(message);
}

function newUuid() {
  return crypto.randomUUID();
}

/** The google.rpc.Status of a failed call, from its `grpc-status-details-bin` trailer, with each
 * detail (a google.protobuf.Any) decoded to its message as a plain object with its `@type`. */
function statusOf(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length !== 1) return null;
  const status = Status.decode(raw[0]);
  return {
    code: status.code,
    message: status.message,
    details: status.details.map((any) => {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      const type = rpcTypes.lookupType(typeName); // throws for a type these protos do not define
      return { '@type': typeName, ...type.toObject(type.decode(any.value), AS_OBJECT) };
    }),
  };
}

class Nexus {
  constructor(address, apiKey) {
    const credentials = grpc.credentials.createInsecure();
    this.identity = new nexus.identity.v1.IdentityService(address, credentials);
    this.work = new nexus.work.v1.WorkService(address, credentials);
    this.chat = new nexus.chat.v1.ChatService(address, credentials);
    this.apiKey = apiKey;
  }

  metadata() {
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${this.apiKey}`);
    return metadata;
  }

  /** A unary call as a promise: the response, or the grpc-js error (code, details, metadata). */
  call(client, method, request) {
    return new Promise((resolve, reject) => {
      client[method](request, this.metadata(), { deadline: Date.now() + CALL_TIMEOUT_MS }, (error, response) => {
        if (error) {
          error.method = method;
          reject(error);
        } else {
          resolve(response);
        }
      });
    });
  }

  /** A call that must fail with `code` and a google.rpc.Status of exactly one ErrorInfo (domain
   * "nexus"); prints the decoded details and returns the ErrorInfo. */
  async callFailing(client, method, request, code) {
    let response;
    try {
      response = await this.call(client, method, request);
    } catch (error) {
      expect(error.code === code, `${method}: ${grpc.status[error.code]} (${error.details}), want ${grpc.status[code]}`);
      const status = statusOf(error);
      expect(status !== null, `${method}: no grpc-status-details-bin trailer`);
      expect(status.code === code, `${method}: google.rpc.Status code ${status.code}, want ${code}`);
      console.log(`${method}: ${grpc.status[error.code]}: ${status.message}`);
      for (const detail of status.details) console.log(`  ${JSON.stringify(detail)}`);
      const infos = status.details.filter((d) => d['@type'] === 'google.rpc.ErrorInfo');
      expect(infos.length === 1 && infos[0].domain === 'nexus', `${method}: ErrorInfo details ${JSON.stringify(infos)}`);
      return { info: infos[0], status };
    }
    throw new Failure(`${method}: succeeded (${JSON.stringify(response)}), want ${grpc.status[code]}`);
  }

  close() {
    for (const client of [this.identity, this.work, this.chat]) client.close();
  }
}

/** Reads a server stream event by event: next() waits for the next one (heartbeats skipped
 * unless asked for), failing after CALL_TIMEOUT_MS or when the stream ends. */
class EventReader {
  constructor(call) {
    this.call = call;
    this.queue = [];
    this.waiters = [];
    this.ended = null;
    call.on('data', (event) => this.push({ event }));
    call.on('error', (error) => this.finish(error));
    call.on('end', () => this.finish(new Failure('StreamEvents ended')));
  }

  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.queue.push(item);
  }

  finish(error) {
    if (this.ended) return;
    this.ended = error;
    for (const waiter of this.waiters.splice(0)) waiter({ error });
  }

  async next({ heartbeats = false } = {}) {
    for (;;) {
      const item = await new Promise((resolve, reject) => {
        if (this.queue.length) return resolve(this.queue.shift());
        if (this.ended) return resolve({ error: this.ended });
        const timer = setTimeout(() => reject(new Failure('StreamEvents: no event within the timeout')), CALL_TIMEOUT_MS);
        this.waiters.push((it) => {
          clearTimeout(timer);
          resolve(it);
        });
      });
      if (item.error) throw item.error;
      if (heartbeats || item.event.type !== 'EVENT_TYPE_HEARTBEAT') return item.event;
    }
  }

  async take(n) {
    const events = [];
    while (events.length < n) events.push(await this.next());
    return events;
  }

  /** Disconnects; the CANCELLED error this causes is expected. */
  cancel() {
    this.ended = this.ended || new Failure('cancelled');
    this.call.cancel();
  }
}

async function create(nx, suffix) {
  const user = await nx.call(nx.identity, 'CreateUser', {
    user: { username: `node-${suffix}`, email: `node-${suffix}@example.com`, full_name: 'Node Example', password: 'correct horse battery' },
    request_id: newUuid(),
  });
  console.log(`created user ${user.id} (${user.username})`);

  const request = {
    project: {
      name: `Apollo ${suffix}`,
      owner_id: user.id,
      budget: { currency_code: 'EUR', units: '12000' }, // int64: a string, as the loader's longs
      start_date: { year: 2026, month: 1, day: 5 },
    },
    request_id: newUuid(), // sent again after a lost answer, it returns the first result
  };
  const project = await nx.call(nx.work, 'CreateProject', request);
  const again = await nx.call(nx.work, 'CreateProject', request);
  expect(again.id === project.id, `a repeated request_id made a second project: ${project.id} and ${again.id}`);
  expect(project.budget.units === '12000', `budget.units ${JSON.stringify(project.budget.units)}, want "12000"`);
  console.log(`created project ${project.id} (${project.name}); its request_id sent again returned it, not a second one`);

  const tasks = [];
  for (let i = 1; i <= 5; i++) {
    tasks.push(
      await nx.call(nx.work, 'CreateTask', {
        task: { project_id: project.id, title: `Launch step ${i}`, tags: ['launch'], estimated_hours: i },
        request_id: newUuid(),
      }),
    );
  }
  expect(tasks.every((t) => t.status === 'TASK_STATUS_TODO'), 'new tasks are not TODO');
  console.log(`created ${tasks.length} tasks`);
  return { project, tasks };
}

async function listPages(nx, project, tasks) {
  const seen = [];
  let pageToken = '';
  let pages = 0;
  do {
    const page = await nx.call(nx.work, 'ListTasks', {
      filter: `project_id = "${project.id}"`,
      order_by: 'create_time',
      page_size: 2,
      page_token: pageToken,
    });
    pages += 1;
    expect(page.total_size === tasks.length, `ListTasks page ${pages}: total_size ${page.total_size}, want ${tasks.length}`);
    seen.push(...page.tasks.map((t) => t.id));
    console.log(`page ${pages}: ${page.tasks.length} tasks`);
    pageToken = page.next_page_token;
    expect(pages <= tasks.length, 'ListTasks: more pages than tasks');
  } while (pageToken);
  const want = tasks.map((t) => t.id).sort();
  seen.sort();
  expect(pages === 3 && JSON.stringify(seen) === JSON.stringify(want), `ListTasks: ${pages} pages with ${seen}, want 3 pages with ${want}`);
  console.log(`listed all ${seen.length} tasks in ${pages} pages`);
}

async function updateWithEtag(nx, task) {
  const done = await nx.call(nx.work, 'UpdateTask', {
    task: { id: task.id, status: 'TASK_STATUS_DONE', etag: task.etag },
    update_mask: { paths: ['status'] },
  });
  expect(
    done.status === 'TASK_STATUS_DONE' && done.completed_time !== null && done.etag !== task.etag,
    `UpdateTask: ${JSON.stringify(done)}`,
  );
  console.log(`updated task ${task.id} to DONE: etag ${task.etag} -> ${done.etag}`);

  const { info } = await nx.callFailing(
    nx.work,
    'UpdateTask',
    { task: { id: task.id, title: 'a lost update', etag: task.etag }, update_mask: { paths: ['title'] } },
    grpc.status.ABORTED,
  );
  expect(
    info.reason === 'ETAG_MISMATCH' && info.metadata.current_etag === done.etag,
    `stale etag: ErrorInfo ${JSON.stringify(info)}, want reason ETAG_MISMATCH and current_etag ${done.etag}`,
  );
}

async function badInput(nx) {
  const { info, status } = await nx.callFailing(nx.work, 'GetTask', { id: 'nope' }, grpc.status.INVALID_ARGUMENT);
  expect(info.reason === 'INVALID_FIELD' && info.metadata.field === 'id', `bad id: ErrorInfo ${JSON.stringify(info)}`);
  const badRequest = status.details.find((d) => d['@type'] === 'google.rpc.BadRequest');
  expect(
    badRequest && badRequest.field_violations.some((v) => v.field === 'id'),
    `bad id: BadRequest ${JSON.stringify(badRequest)}, want a violation of field id`,
  );
}

function expectMessages(events, channelId, texts) {
  events.forEach((event, i) => {
    const ok =
      event.type === 'EVENT_TYPE_CREATED' &&
      event.resource === 'chat_message' &&
      event.chat_message.content === texts[i] &&
      event.scope === `channels/${channelId}` &&
      event.resume_token !== '' &&
      (i === 0 || BigInt(event.sequence) === BigInt(events[i - 1].sequence) + 1n);
    expect(ok, `event ${i}: ${JSON.stringify(event)}, want the creation of ${JSON.stringify(texts[i])}`);
  });
}

async function streamWithResume(nx, suffix) {
  const channel = await nx.call(nx.chat, 'CreateChannel', { channel: { name: `node-example-${suffix}` }, request_id: newUuid() });
  const post = (content) =>
    nx.call(nx.chat, 'CreateChatMessage', { chat_message: { channel_id: channel.id, content }, request_id: newUuid() });

  // A heartbeat every second; the first one says the stream is subscribed, so every message
  // posted after it reaches this stream.
  const first = new EventReader(nx.chat.StreamEvents({ channel_ids: [channel.id], heartbeat_seconds: 1 }, nx.metadata()));
  const beat = await first.next({ heartbeats: true });
  expect(beat.type === 'EVENT_TYPE_HEARTBEAT', `StreamEvents: first event ${beat.type}, want a heartbeat`);
  for (const text of ['a1', 'a2', 'a3']) await post(text);
  const got = await first.take(3);
  expectMessages(got, channel.id, ['a1', 'a2', 'a3']);
  const last = got[got.length - 1];
  console.log(`stream: read ${got.length} events (sequence ${got[0].sequence}..${last.sequence}), disconnecting`);
  first.cancel();

  for (const text of ['b1', 'b2']) await post(text);
  const resumed = new EventReader(nx.chat.StreamEvents({ resume_token: last.resume_token, heartbeat_seconds: 1 }, nx.metadata()));
  const missed = await resumed.take(2);
  resumed.cancel();
  expectMessages(missed, channel.id, ['b1', 'b2']);
  expect(
    BigInt(missed[0].sequence) === BigInt(last.sequence) + 1n,
    `resumed at sequence ${missed[0].sequence}, want ${BigInt(last.sequence) + 1n}`,
  );
  console.log(`stream: resumed after sequence ${last.sequence} and got exactly the ${missed.length} missed events`);
}

async function main() {
  const address = process.env.NEXUS_ADDRESS || 'localhost:50051';
  const apiKey = process.env.NEXUS_API_KEY;
  if (!apiKey) throw new Failure('set NEXUS_API_KEY to an admin API key');
  const nx = new Nexus(address, apiKey);
  try {
    const suffix = crypto.randomBytes(4).toString('hex');
    const { project, tasks } = await create(nx, suffix);
    await listPages(nx, project, tasks);
    await updateWithEtag(nx, tasks[0]);
    await badInput(nx);
    await streamWithResume(nx, suffix);
  } finally {
    nx.close();
  }
  console.log('node example: every step answered as expected');
}

main().catch((error) => {
  const where = error.method ? `${error.method}: ` : '';
  const code = error.code !== undefined && !(error instanceof Failure) ? `${grpc.status[error.code]}: ` : '';
  console.error(`node example FAILED: ${where}${code}${error.details || error.message}`);
  process.exit(1);
});
