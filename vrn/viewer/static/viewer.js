// vrn-edge face viewer: one ES module (no build step) for both pages.
//
// - The static page (`vrn-reconstruct --formats html`) inlines this file and calls
//   showStatic() with the photo (JPEG) and the mesh (binary GLB) embedded in the page.
// - The live page (`vrn-live --web`) imports it from the server and calls startLive(),
//   which reads JPEG frames, mesh messages and stats from a WebSocket.
//
// Meshes arrive in photo pixels: x right, y down, z toward the camera (a GLB in glTF's
// y-up frame, (x, -y, z)); vertices (N, 3)
// float32 (GLB) or uint16 quantised (live: x = origin + q * scale), triangles (M, 3)
// uint32, colours (N, 3 or 4) uint8 sRGB. The buffers go to the GPU as they came: the
// object's transform dequantises and turns them into the scene's (x, -y, z) (three.js is
// y up; it flips the winding of a mirroring transform itself), and the material shades
// each triangle from screen-space derivatives, so no normals are computed.
//
// The page reports its state in window.vrnViewer.state: {rendered, vertices, faces,
// frames, meshes, loadMs, error}, and document.documentElement.dataset.rendered.
import * as THREE from 'three';
import { OrbitControls } from 'three/addons/controls/OrbitControls.js';

const BACKGROUND = 0x202226;
const FOV = 30;

// sRGB byte -> linear value: three.js lights and blends in linear space.
const SRGB_TO_LINEAR = Float32Array.from({ length: 256 }, (_, i) => {
  const c = i / 255;
  return c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4);
});

// ------------------------------------------------------------------------ decoding

const GLB_TYPES = {
  5120: Int8Array, 5121: Uint8Array, 5122: Int16Array, 5123: Uint16Array,
  5125: Uint32Array, 5126: Float32Array,
};
const GLB_WIDTHS = { SCALAR: 1, VEC2: 2, VEC3: 3, VEC4: 4 };

function readAccessor(gltf, bin, index) {
  const accessor = gltf.accessors[index];
  const view = gltf.bufferViews[accessor.bufferView];
  const Type = GLB_TYPES[accessor.componentType];
  const width = GLB_WIDTHS[accessor.type];
  if (!Type || !width) throw new Error(`GLB accessor ${index}: unsupported type`);
  if (view.byteStride && view.byteStride !== width * Type.BYTES_PER_ELEMENT) {
    throw new Error('GLB: interleaved buffers are not supported');
  }
  const offset = bin.byteOffset + (view.byteOffset || 0) + (accessor.byteOffset || 0);
  const length = accessor.count * width;
  if (offset + length * Type.BYTES_PER_ELEMENT > bin.byteOffset + bin.byteLength) {
    throw new Error(`GLB accessor ${index} runs past the binary chunk`);
  }
  const array = offset % Type.BYTES_PER_ELEMENT === 0
    ? new Type(bin.buffer, offset, length)
    : new Type(bin.buffer.slice(offset, offset + length * Type.BYTES_PER_ELEMENT));
  return { array, width, normalized: Boolean(accessor.normalized) };
}

/**
 * The first triangle mesh of a binary glTF (GLB) file.
 * @param {ArrayBuffer} buffer the whole file
 * @returns {Mesh} positions float32 (N*3, photo pixels), indices (M*3), colours uint8
 */
export function parseGLB(buffer) {
  const data = new DataView(buffer);
  if (buffer.byteLength < 20 || data.getUint32(0, true) !== 0x46546c67) {
    throw new Error('not a binary glTF (GLB) file');
  }
  const jsonLength = data.getUint32(12, true);
  if (data.getUint32(16, true) !== 0x4e4f534a) throw new Error('GLB: no JSON chunk');
  const gltf = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 20, jsonLength)));
  const binStart = 20 + jsonLength;
  if (data.getUint32(binStart + 4, true) !== 0x004e4942) throw new Error('GLB: no BIN chunk');
  const bin = new Uint8Array(buffer, binStart + 8, data.getUint32(binStart, true));
  const primitive = gltf.meshes?.[0]?.primitives?.[0];
  if (!primitive || (primitive.mode ?? 4) !== 4 || primitive.indices === undefined) {
    throw new Error('GLB: no indexed triangle mesh');
  }
  const positions = readAccessor(gltf, bin, primitive.attributes.POSITION);
  if (!(positions.array instanceof Float32Array) || positions.width !== 3) {
    throw new Error('GLB: positions must be float32 (x, y, z)');
  }
  const indices = Uint32Array.from(readAccessor(gltf, bin, primitive.indices).array);
  let colors = null;
  let colorStride = 3;
  if (primitive.attributes.COLOR_0 !== undefined) {
    const c = readAccessor(gltf, bin, primitive.attributes.COLOR_0);
    colorStride = c.width;
    colors = c.array instanceof Uint8Array ? c.array
      : Uint8Array.from(c.array, (v) => Math.round(Math.min(Math.max(v, 0), 1) * 255));
  }
  // A GLB is in glTF's y-up frame, (x, -y, z) photo pixels with its winding reversed:
  // scale y by -1 and meshTransform's photo-to-scene flip cancels out.
  return {
    positions: positions.array, origin: [0, 0, 0], scale: [1, -1, 1], indices, colors,
    colorStride,
  };
}

/**
 * A binary message of the live server: a 4-byte ASCII tag ("JPEG", "MESH"), a uint32
 * (little endian) header length, a UTF-8 JSON header, padding to 4 bytes, the body.
 * Section offsets in the header count from the body's start.
 */
export function parseMessage(buffer) {
  const bytes = new Uint8Array(buffer);
  const tag = String.fromCharCode(bytes[0], bytes[1], bytes[2], bytes[3]);
  const headerLength = new DataView(buffer).getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  const body = (8 + headerLength + 3) & ~3;
  return { tag, header, buffer, body };
}

/**
 * A MESH message's mesh: vertices quantised to uint16 over the mesh's box
 * (x = origin + q * scale per axis), triangles uint32, colours uint8 RGB.
 */
export function decodeMesh({ header, buffer, body }) {
  const n = header.vertices;
  const m = header.triangles;
  const sections = header.sections;
  return {
    positions: new Uint16Array(buffer, body + sections.vertices, n * 3),
    origin: header.origin,
    scale: header.scale,
    indices: new Uint32Array(buffer, body + sections.triangles, m * 3),
    colors: new Uint8Array(buffer, body + sections.colors, n * 3),
    colorStride: 3,
  };
}

function base64Bytes(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

/**
 * @typedef {Object} Mesh  vertex i is origin + positions[3i..3i+2] * scale, photo pixels
 * @property {Float32Array|Uint16Array} positions (N*3)
 * @property {number[]} origin, scale (3 each)
 * @property {Uint32Array} indices (M*3)
 * @property {Uint8Array|null} colors (N*colorStride), sRGB
 * @property {number} colorStride 3 or 4
 */

/** The mesh's buffers as geometry (its own frame; see meshTransform), linear colours. */
export function meshGeometry({ positions, indices, colors, colorStride }) {
  const n = positions.length / 3;
  const rgb = new Float32Array(n * 3).fill(0.6);
  if (colors) {
    for (let i = 0, j = 0; i < n * 3; i += 3, j += colorStride) {
      rgb[i] = SRGB_TO_LINEAR[colors[j]];
      rgb[i + 1] = SRGB_TO_LINEAR[colors[j + 1]];
      rgb[i + 2] = SRGB_TO_LINEAR[colors[j + 2]];
    }
  }
  const geometry = new THREE.BufferGeometry();
  geometry.setAttribute('position', new THREE.BufferAttribute(positions, 3));
  geometry.setAttribute('color', new THREE.BufferAttribute(rgb, 3));
  geometry.setIndex(new THREE.BufferAttribute(indices, 1));
  geometry.computeBoundingBox();
  geometry.computeBoundingSphere();
  return geometry;
}

/** The transform from a mesh's own frame to the scene's (x, -y, z) photo pixels. */
export function meshTransform({ origin, scale }) {
  return new THREE.Matrix4()
    .makeTranslation(origin[0], -origin[1], origin[2])
    .scale(new THREE.Vector3(scale[0], -scale[1], scale[2]));
}

// -------------------------------------------------------------------------- viewer

/**
 * The page's two views of one mesh: the photo with the mesh overlaid (orthographic, in
 * photo pixels) and the coloured mesh in 3D (orbit, zoom, front/side, wireframe).
 * Elements by id: photo, overlay (canvases stacked), view (canvas), front, side,
 * wireframe, show-overlay (controls), status, hud, timings, model.
 */
export class FaceViewer {
  constructor(doc = document, { antialias = true } = {}) {
    this.doc = doc;
    this.state = {
      rendered: false, vertices: 0, faces: 0, frames: 0, meshes: 0, loadMs: null, error: null,
    };
    this.photoCanvas = doc.getElementById('photo');
    this.overlayCanvas = doc.getElementById('overlay');
    this.viewCanvas = doc.getElementById('view');
    this.photoSize = null;
    this.geometry = null;
    this.fitted = false;
    this.pending = false;
    this.onRender = null;

    this.viewRenderer = new THREE.WebGLRenderer({ canvas: this.viewCanvas, antialias });
    this.viewRenderer.setClearColor(BACKGROUND);
    this.overlayRenderer = new THREE.WebGLRenderer({
      canvas: this.overlayCanvas, antialias, alpha: true,
    });
    this.overlayRenderer.setClearColor(0x000000, 0);
    for (const r of [this.viewRenderer, this.overlayRenderer]) {
      r.setPixelRatio(window.devicePixelRatio || 1);
    }

    this.scene = new THREE.Scene();
    this.group = new THREE.Group();
    this.scene.add(this.group);
    this.scene.add(new THREE.AmbientLight(0xffffff, 0.9));
    this.camera = new THREE.PerspectiveCamera(FOV, 1, 1, 1e5);
    const headlight = new THREE.DirectionalLight(0xffffff, 2.4);
    headlight.position.set(0.5, 0.6, 1);
    this.camera.add(headlight);
    this.scene.add(this.camera);
    this.material = new THREE.MeshLambertMaterial({
      vertexColors: true, flatShading: true, side: THREE.DoubleSide,
    });

    this.overlayScene = new THREE.Scene();
    this.overlayScene.add(new THREE.AmbientLight(0xffffff, 0.6));
    const overlayLight = new THREE.DirectionalLight(0xffffff, 2.4);
    overlayLight.position.set(0.2, 0.3, 1);
    this.overlayScene.add(overlayLight);
    this.overlayCamera = new THREE.OrthographicCamera(0, 1, 0, -1, 1, 1e5);
    this.overlayMaterial = new THREE.MeshLambertMaterial({
      color: 0xd0d0d0, flatShading: true, side: THREE.DoubleSide,
    });

    this.controls = new OrbitControls(this.camera, this.viewCanvas);
    this.controls.addEventListener('change', () => this.requestRender());

    this.bind('front', 'click', () => this.frontView());
    this.bind('side', 'click', () => this.sideView());
    this.bind('wireframe', 'change', (e) => this.setWireframe(e.target.checked));
    this.bind('show-overlay', 'change', (e) => {
      this.overlayCanvas.style.visibility = e.target.checked ? 'visible' : 'hidden';
      this.requestRender();
    });
    new ResizeObserver(() => this.requestRender()).observe(this.viewCanvas);
    new ResizeObserver(() => this.requestRender()).observe(this.photoCanvas);
  }

  bind(id, event, handler) {
    const element = this.doc.getElementById(id);
    if (element) element.addEventListener(event, handler);
  }

  /** Draw the photo; the mesh's photo frame is (width, height) pixels. */
  setPhoto(image, width, height) {
    const c = this.photoCanvas;
    if (c.width !== image.width || c.height !== image.height) {
      c.width = image.width;
      c.height = image.height;
    }
    c.getContext('2d').drawImage(image, 0, 0);
    if (!this.photoSize || this.photoSize[0] !== width || this.photoSize[1] !== height) {
      this.photoSize = [width, height];
      Object.assign(this.overlayCamera, { left: 0, right: width, top: 0, bottom: -height });
      this.overlayCamera.updateProjectionMatrix();
    }
    this.state.frames += 1;
    this.requestRender();
  }

  /** Show a mesh (see meshGeometry), or none (null). Keeps the orbit. */
  setMesh(mesh) {
    if (this.geometry) this.geometry.dispose();
    this.group.clear();
    if (this.overlayMesh) this.overlayScene.remove(this.overlayMesh);
    this.overlayMesh = null;
    this.geometry = mesh && mesh.indices.length ? meshGeometry(mesh) : null;
    this.state.vertices = mesh ? mesh.positions.length / 3 : 0;
    this.state.faces = mesh ? mesh.indices.length / 3 : 0;
    this.state.meshes += 1;
    if (this.geometry) {
      const transform = meshTransform(mesh);
      const box = this.geometry.boundingBox.clone().applyMatrix4(transform);
      this.radius = box.getBoundingSphere(new THREE.Sphere()).radius;
      this.group.position.copy(box.getCenter(new THREE.Vector3())).negate();
      this.group.add(this.placed(this.material, transform));
      this.overlayMesh = this.placed(this.overlayMaterial, transform);
      this.overlayScene.add(this.overlayMesh);
      this.overlayCamera.position.z = box.max.z + 10;
      this.overlayCamera.far = box.max.z - box.min.z + 20;
      this.overlayCamera.updateProjectionMatrix();
      if (!this.fitted) this.frontView();
    }
    this.requestRender();
  }

  placed(material, transform) {
    const object = new THREE.Mesh(this.geometry, material);
    object.matrixAutoUpdate = false;
    object.matrix.copy(transform);
    return object;
  }

  setWireframe(on) {
    this.material.wireframe = on;
    this.requestRender();
  }

  distance() {
    const radius = this.geometry ? this.radius : 100;
    return (1.15 * radius) / Math.sin(THREE.MathUtils.degToRad(FOV / 2));
  }

  /** Look at the face from the front (the camera's side of the photo). */
  frontView() { this.look(new THREE.Vector3(0, 0, 1)); }

  /** Look at the face from its left (the photo's right). */
  sideView() { this.look(new THREE.Vector3(1, 0, 0)); }

  look(direction) {
    const d = this.distance();
    this.camera.position.copy(direction).multiplyScalar(d);
    this.camera.up.set(0, 1, 0);
    this.camera.near = d / 100;
    this.camera.far = d * 100;
    this.camera.updateProjectionMatrix();
    this.controls.target.set(0, 0, 0);
    this.controls.update();
    this.fitted = Boolean(this.geometry);
    this.requestRender();
  }

  requestRender() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  resize(renderer, canvas) {
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    const size = renderer.getSize(new THREE.Vector2());
    if (w > 0 && h > 0 && (size.x !== w || size.y !== h)) renderer.setSize(w, h, false);
    return w / Math.max(h, 1);
  }

  render() {
    const aspect = this.resize(this.viewRenderer, this.viewCanvas);
    if (this.camera.aspect !== aspect) {
      this.camera.aspect = aspect;
      this.camera.updateProjectionMatrix();
    }
    this.viewRenderer.render(this.scene, this.camera);
    if (this.photoSize && this.overlayCanvas.style.visibility !== 'hidden') {
      this.resize(this.overlayRenderer, this.overlayCanvas);
      this.overlayRenderer.render(this.overlayScene, this.overlayCamera);
    }
    if (this.geometry && !this.state.rendered) {
      this.state.rendered = true;
      this.state.loadMs = Math.round(performance.now());
      this.doc.documentElement.dataset.rendered = 'true';
    }
    if (this.onRender) this.onRender();
  }

  /**
   * Where photo-pixel points (x, y, z) land in the 3D view: [x, y] in CSS pixels from the
   * view canvas's top left, and depth (NDC z, -1 near .. 1 far). For tests and tools.
   */
  projectToView(points) {
    if (!this.geometry) return [];
    this.group.updateMatrixWorld();
    const w = this.viewCanvas.clientWidth;
    const h = this.viewCanvas.clientHeight;
    const v = new THREE.Vector3();
    return points.map(([x, y, z]) => {
      v.set(x, -y, z).applyMatrix4(this.group.matrixWorld).project(this.camera);
      return [(v.x + 1) / 2 * w, (1 - v.y) / 2 * h, v.z];
    });
  }

  setText(id, text) {
    const element = this.doc.getElementById(id);
    if (element) element.textContent = text;
  }

  /** The per-stage milliseconds as a table. */
  setTimings(timings) {
    const table = this.doc.getElementById('timings');
    if (!table) return;
    table.replaceChildren(...Object.entries(timings).map(([stage, ms]) => {
      const row = this.doc.createElement('tr');
      const name = this.doc.createElement('td');
      const value = this.doc.createElement('td');
      name.textContent = stage;
      value.textContent = `${ms.toFixed(1)} ms`;
      row.append(name, value);
      return row;
    }));
  }

  fail(error) {
    this.state.error = String(error && error.message ? error.message : error);
    this.doc.documentElement.dataset.error = this.state.error;
    this.setText('status', `error: ${this.state.error}`);
    console.error(error);
  }
}

function createViewer(options) {
  try {
    const viewer = new FaceViewer(document, options);
    window.vrnViewer = viewer;
    return viewer;
  } catch (error) {
    const message = `cannot start the 3D view (WebGL unavailable?): ${error.message || error}`;
    window.vrnViewer = { state: { error: message } };
    document.documentElement.dataset.error = message;
    const status = document.getElementById('status');
    if (status) status.textContent = message;
    throw error;
  }
}

const count = (n) => n.toLocaleString('en-US');

// --------------------------------------------------------------------- static page

/**
 * The static page: data = {model: {name, detail}, timings: {stage: ms},
 * photo: {jpeg: base64, width, height}, mesh: {glb: base64}}.
 */
export async function showStatic(data) {
  const viewer = createViewer();
  try {
    viewer.setText('model', data.model.name);
    viewer.setText('model-detail', data.model.detail || '');
    viewer.setTimings(data.timings);
    const image = new Image();
    image.src = `data:image/jpeg;base64,${data.photo.jpeg}`;
    await image.decode();
    viewer.setPhoto(image, data.photo.width, data.photo.height);
    const glb = base64Bytes(data.mesh.glb);
    viewer.setMesh(parseGLB(glb.buffer));
    viewer.onRender = () => {
      const s = viewer.state;
      viewer.setText('status', `${count(s.vertices)} vertices, ${count(s.faces)} triangles`
        + ` · shown in ${s.loadMs} ms`);
      viewer.onRender = null;
    };
  } catch (error) {
    viewer.fail(error);
  }
  return viewer;
}

// ----------------------------------------------------------------------- live page

const HUD_LABELS = {
  detect: 'det', landmarks: 'lmk', crop: 'crop', infer: 'net', isosurface: 'iso',
  colour: 'col',
};

/**
 * The live page: frames, meshes and stats from the server's WebSocket at `path`
 * (read on a worker, live_socket.js beside this file; the page draws the newest).
 */
export function startLive({ path = 'ws' } = {}) {
  // The mesh changes every frame: no multisampling, which triples the cost of drawing
  // 200,000 triangles where WebGL runs in software.
  const viewer = createViewer({ antialias: false });
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  const token = new URLSearchParams(window.location.search).get('token');
  if (token) url.searchParams.set('token', token);
  const since = performance.now();
  let received = { frames: 0, meshes: 0, bytes: 0 };
  viewer.state.received = received;

  function showStats(stats) {
    const seconds = Math.max((performance.now() - since) / 1000, 1e-3);
    const stages = Object.entries(HUD_LABELS)
      .filter(([stage]) => stage in stats.stages_ms)
      .map(([stage, label]) => `${label} ${stats.stages_ms[stage].toFixed(0)}`).join(' · ');
    viewer.setText('hud', `${stats.fps.toFixed(1)} FPS · frame ${stats.frame} · `
      + `faces ${stats.faces}`);
    viewer.setText('hud-stages', `${stages} ms`);
    viewer.setText('hud-client', `this page: received ${count(received.meshes)} meshes `
      + `(${(received.meshes / seconds).toFixed(1)}/s), drew ${count(viewer.state.meshes)} `
      + `(${(viewer.state.meshes / seconds).toFixed(1)}/s)`);
    viewer.setTimings(stats.stages_ms);
  }

  async function draw({ frame, mesh }) {
    if (frame) {
      const message = parseMessage(frame);
      const jpeg = new Blob([new Uint8Array(frame, message.body)], { type: 'image/jpeg' });
      const bitmap = await createImageBitmap(jpeg);
      viewer.setPhoto(bitmap, message.header.width, message.header.height);
      bitmap.close();
    }
    if (mesh) {
      const message = parseMessage(mesh);
      viewer.setMesh(message.header.vertices ? decodeMesh(message) : null);
    }
    await new Promise((resolve) => requestAnimationFrame(resolve));
  }

  const socket = new Worker(new URL('./live_socket.js', import.meta.url));
  socket.onmessage = async ({ data }) => {
    if (data.type === 'status') {
      viewer.setText('status', data.text);
    } else if (data.type === 'text') {
      received = viewer.state.received = data.received;
      const message = JSON.parse(data.data);
      if (message.type === 'hello') {
        viewer.setText('model', message.model.name);
        viewer.setText('model-detail', message.model.detail || '');
        viewer.setText('source', message.source || '');
      } else if (message.type === 'stats') {
        showStats(message);
      }
    } else if (data.type === 'bundle') {
      received = viewer.state.received = data.received;
      try {
        await draw(data);
      } catch (error) {
        viewer.fail(error);
      }
      socket.postMessage({ type: 'ready' });
    }
  };
  socket.postMessage({ type: 'connect', url: url.href });
  return viewer;
}
