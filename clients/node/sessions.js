#!/usr/bin/env node
// Agent Sessions from Node.js, with nothing generated: @grpc/proto-loader reads the contract at run time,
// either from the .proto files (proto/ in this repository) or from the descriptor set that
// `make descriptor` writes, and @grpc/grpc-js calls the server.
//
//   node sessions.js --target 127.0.0.1:50051 [--descriptor-set FILE | --proto-root DIR] [--session-id ID]
//
// It creates a session, appends a conversation (a tool call and its result included), pages through the
// history both ways, reads a missing session to show the rich error (google.rpc.Status with ErrorInfo),
// and prints what it saw as one JSON object.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

// Field names as in the .proto files, 64-bit integers as strings, enums by name.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const SERVICE_FILES = ['session_service.proto', 'message_service.proto'];

/** The agentsessions.v1 package, loaded from a descriptor set (a file) or from the .proto files. */
function loadContract({ descriptorSet, protoRoot }) {
  const definition = descriptorSet
    ? protoLoader.fromJSON(rootFromDescriptorSet(fs.readFileSync(descriptorSet)).toJSON(), LOADER_OPTIONS)
    : protoLoader.loadSync(
        SERVICE_FILES.map((f) => path.join('agentsessions', 'v1', f)),
        { ...LOADER_OPTIONS, includeDirs: [protoRoot] },
      );
  return grpc.loadPackageDefinition(definition).agentsessions.v1;
}

// protobufjs builds a map field read from a descriptor as the repeated `XxxEntry` message that encodes
// it (protoLoader.loadFileDescriptorSetFromBuffer has the same flaw), so `metadata: {k: v}` would not
// serialize. The descriptors mark those entries (options.map_entry): turn their fields back into maps.
function rootFromDescriptorSet(bytes) {
  const set = descriptor.FileDescriptorSet.decode(bytes);
  const entries = new Set();
  const walk = (prefix, messages) => {
    for (const m of messages || []) {
      if (m.options && m.options.mapEntry) entries.add(`${prefix}.${m.name}`);
      walk(`${prefix}.${m.name}`, m.nestedType);
    }
  };
  for (const file of set.file) walk(file.package ? `.${file.package}` : '', file.messageType);
  const root = protobuf.Root.fromDescriptor(set);
  const fix = (namespace) => {
    for (const child of namespace.nestedArray) {
      if (child instanceof protobuf.Type) {
        for (const field of child.fieldsArray.slice()) {
          const type = field.type.startsWith('.') ? field.type : `${child.fullName}.${field.type}`;
          if (!entries.has(type)) continue;
          const entry = root.lookupType(type);
          child.remove(field);
          child.add(new protobuf.MapField(field.name, field.id, entry.fields.key.type, entry.fields.value.type));
        }
      }
      if (child instanceof protobuf.Namespace) fix(child);
    }
  };
  fix(root);
  return root;
}

// The gRPC rich error model: the server puts a serialized google.rpc.Status in this trailer.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
          },
        },
      },
    },
  },
});

/** code, reason, domain and metadata of a failed call, from its google.rpc.Status trailer. */
function richError(err) {
  const out = { code: grpc.status[err.code], message: err.details };
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return out;
  const status = rpcTypes.lookupType('google.rpc.Status').decode(raw);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = rpcTypes.lookupType('google.rpc.ErrorInfo').decode(detail.value);
      Object.assign(out, { reason: info.reason, domain: info.domain, metadata: { ...info.metadata } });
    }
  }
  return out;
}

/** A unary call as a promise, with a deadline. */
function unary(client, method, request, seconds = 10) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + seconds * 1000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function text(role, value) {
  return { role, parts: [{ text: { text: value } }] };
}

async function run({ target, contract, sessionId }) {
  const credentials = grpc.credentials.createInsecure();
  const sessions = new contract.SessionService(target, credentials);
  const messages = new contract.MessageService(target, credentials);
  try {
    const created = await unary(sessions, 'CreateSession', {
      session_id: sessionId,
      session: {
        agent_id: 'echo',
        user_id: 'node-user',
        metadata: { client: 'node' },
      },
    });
    const appended = await unary(messages, 'AppendMessages', {
      session_id: created.session_id,
      messages: [
        text('ROLE_USER', 'What is the weather in Paris?'),
        {
          role: 'ROLE_ASSISTANT',
          parts: [{ tool_call: { call_id: 'call-1', name: 'weather', arguments: '{"city":"Paris"}' } }],
        },
        {
          role: 'ROLE_TOOL',
          parts: [{ tool_result: { call_id: 'call-1', name: 'weather', output: '{"celsius":21}' } }],
        },
        text('ROLE_ASSISTANT', 'It is 21 °C in Paris.'),
      ],
    });
    // Oldest first, two at a time, following next_page_token to the end.
    const history = [];
    let page_token = '';
    let pages = 0;
    do {
      const page = await unary(messages, 'ListMessages', {
        session_id: created.session_id,
        page_size: 2,
        page_token,
      });
      history.push(...page.messages);
      page_token = page.next_page_token;
      pages += 1;
    } while (page_token);
    const newest = await unary(messages, 'ListMessages', {
      session_id: created.session_id,
      page_size: 1,
      order: 'MESSAGE_ORDER_DESCENDING',
    });
    let missing = null;
    try {
      await unary(sessions, 'GetSession', { session_id: `${created.session_id}/missing` });
    } catch (err) {
      missing = richError(err);
    }
    return {
      session: {
        session_id: created.session_id,
        agent_id: created.agent_id,
        status: created.status,
        metadata: created.metadata,
      },
      appended: appended.messages.map((m) => m.sequence),
      message_count: appended.session.message_count,
      pages,
      history: history.map((m) => ({
        sequence: m.sequence,
        role: m.role,
        kinds: m.parts.map((p) => p.kind),
        text: m.parts.filter((p) => p.kind === 'text').map((p) => p.text.text).join(''),
      })),
      newest: newest.messages.map((m) => m.sequence),
      missing,
    };
  } finally {
    sessions.close();
    messages.close();
  }
}

function parseArgs(argv) {
  const args = { target: '127.0.0.1:50051', protoRoot: path.join(__dirname, '..', '..', 'proto') };
  for (let i = 0; i < argv.length; i += 2) {
    const [name, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${name} needs a value`);
    const key = { '--target': 'target', '--proto-root': 'protoRoot', '--descriptor-set': 'descriptorSet',
      '--session-id': 'sessionId' }[name];
    if (!key) throw new Error(`unknown option ${name}`);
    args[key] = value;
  }
  args.sessionId = args.sessionId || `node/${Date.now()}`;
  return args;
}

if (require.main === module) {
  const args = parseArgs(process.argv.slice(2));
  run({ target: args.target, contract: loadContract(args), sessionId: args.sessionId }).then(
    (result) => process.stdout.write(`${JSON.stringify(result)}\n`),
    (err) => {
      process.stderr.write(`${JSON.stringify(richError(err))}\n${err.stack}\n`);
      process.exit(1);
    },
  );
}

module.exports = { loadContract, richError, run };
