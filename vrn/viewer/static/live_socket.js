// vrn-edge live page: the WebSocket, on a worker thread (a classic worker, no imports).
//
// The page's main thread draws; drawing a 200,000-triangle mesh can take it longer than
// a frame. Reading the socket here keeps the connection drained whatever the drawing
// costs: every message is received and counted at once, and only the newest frame and
// mesh wait for the page, which asks for them ({type: "ready"}) when it has drawn the
// last ones. Text messages (hello, stats) are passed on at once.
//
// From the page: {type: "connect", url}, {type: "ready"}.
// To the page: {type: "text", data, received}, {type: "status", text},
//              {type: "bundle", frame: ArrayBuffer|null, mesh: ArrayBuffer|null,
//               received: {frames, meshes, bytes}} (the buffers are transferred).
let url = null;
let pageReady = true;
let latest = { frame: null, mesh: null };
const received = { frames: 0, meshes: 0, bytes: 0 };

function tagOf(buffer) {
  const b = new Uint8Array(buffer, 0, 4);
  return String.fromCharCode(b[0], b[1], b[2], b[3]);
}

function flush() {
  if (!pageReady || !(latest.frame || latest.mesh)) return;
  const { frame, mesh } = latest;
  latest = { frame: null, mesh: null };
  pageReady = false;
  postMessage({ type: 'bundle', frame, mesh, received: { ...received } },
    [frame, mesh].filter(Boolean));
}

function connect() {
  const socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => postMessage({ type: 'status', text: 'connected' });
  socket.onclose = (event) => {
    const why = event.code === 1001 ? 'the server stopped' : `closed (${event.code})`;
    postMessage({ type: 'status', text: `disconnected: ${why}; retrying` });
    setTimeout(connect, 2000);
  };
  socket.onmessage = (event) => {
    if (typeof event.data === 'string') {
      postMessage({ type: 'text', data: event.data, received: { ...received } });
      return;
    }
    received.bytes += event.data.byteLength;
    const tag = tagOf(event.data);
    if (tag === 'JPEG') {
      received.frames += 1;
      latest.frame = event.data;
    } else if (tag === 'MESH') {
      received.meshes += 1;
      latest.mesh = event.data;
    }
    flush();
  };
}

onmessage = (event) => {
  if (event.data.type === 'connect') {
    url = event.data.url;
    connect();
  } else if (event.data.type === 'ready') {
    pageReady = true;
    flush();
  }
};
