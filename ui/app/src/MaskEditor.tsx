// The inpainting mask, painted over the picture with a mouse, pen or finger (pointer events). The canvas
// keeps the mask in its alpha channel at the picture's own size; toBlob() gives the white-on-black PNG the
// API takes.
import { forwardRef, useCallback, useEffect, useImperativeHandle, useRef, useState, type PointerEvent as ReactPointerEvent } from "react";

export interface MaskHandle {
  /** The mask as a PNG: white where the picture changes, black elsewhere. */
  toBlob: () => Promise<Blob>;
  isEmpty: () => boolean;
}

const TINT = [255, 64, 112] as const;
const UNDO_DEPTH = 30;

export interface MaskEditorProps {
  src: string;
  width: number;
  height: number;
  /** Where the mask is kept between visits: restored when it was painted over the same picture. */
  keep?: { current: { src: string; data: ImageData } | null };
}

export const MaskEditor = forwardRef<MaskHandle, MaskEditorProps>(function MaskEditor({ src, width, height, keep }, ref) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const undo = useRef<ImageData[]>([]);
  const last = useRef<{ x: number; y: number } | null>(null);
  const [size, setSize] = useState(() => Math.max(4, Math.round(Math.min(width, height) / 10)));
  const [eraser, setEraser] = useState(false);
  const [undoCount, setUndoCount] = useState(0);
  const ctx = () => canvas.current!.getContext("2d", { willReadFrequently: true })!;

  useEffect(() => {
    undo.current = [];
    setUndoCount(0);
    setSize(Math.max(4, Math.round(Math.min(width, height) / 10)));
    const kept = keep?.current;
    if (kept && kept.src === src && kept.data.width === width && kept.data.height === height) ctx().putImageData(kept.data, 0, 0);
  }, [src, width, height]);

  const save = () => {
    if (keep) keep.current = { src, data: ctx().getImageData(0, 0, width, height) };
  };

  const snapshot = () => {
    undo.current.push(ctx().getImageData(0, 0, width, height));
    if (undo.current.length > UNDO_DEPTH) undo.current.shift();
    setUndoCount(undo.current.length);
  };

  const map = (e: { clientX: number; clientY: number }) => {
    const r = canvas.current!.getBoundingClientRect();
    return { x: ((e.clientX - r.left) / r.width) * width, y: ((e.clientY - r.top) / r.height) * height };
  };

  const stroke = (from: { x: number; y: number }, to: { x: number; y: number }, pressure: number) => {
    const c = ctx();
    c.globalCompositeOperation = eraser ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = `rgb(${TINT.join(",")})`;
    c.lineCap = c.lineJoin = "round";
    c.lineWidth = size * pressure;
    c.beginPath();
    c.moveTo(from.x, from.y);
    c.lineTo(to.x + 0.01, to.y);
    c.stroke();
  };

  const pressureOf = (e: ReactPointerEvent | PointerEvent) => (e.pointerType === "pen" && e.pressure > 0 ? 0.25 + e.pressure * 1.5 : 1);

  const down = (e: ReactPointerEvent<HTMLCanvasElement>) => {
    if (e.button !== 0) return;
    e.currentTarget.setPointerCapture(e.pointerId);
    snapshot();
    const p = map(e);
    last.current = p;
    stroke(p, p, pressureOf(e));
  };
  const move = (e: ReactPointerEvent<HTMLCanvasElement>) => {
    if (!last.current) return;
    const events = e.nativeEvent.getCoalescedEvents?.() ?? [e.nativeEvent];
    for (const ev of events.length ? events : [e.nativeEvent]) {
      const p = map(ev);
      stroke(last.current, p, pressureOf(ev));
      last.current = p;
    }
  };
  const up = () => {
    if (last.current) save();
    last.current = null;
  };

  const edit = (f: (data: Uint8ClampedArray) => void) => {
    snapshot();
    const image = ctx().getImageData(0, 0, width, height);
    f(image.data);
    ctx().putImageData(image, 0, 0);
    save();
  };
  const invert = () =>
    edit((d) => {
      for (let i = 0; i < d.length; i += 4) {
        d[i] = TINT[0];
        d[i + 1] = TINT[1];
        d[i + 2] = TINT[2];
        d[i + 3] = 255 - d[i + 3]!;
      }
    });
  const clear = () => edit((d) => d.fill(0));
  const back = () => {
    const prev = undo.current.pop();
    if (prev) ctx().putImageData(prev, 0, 0);
    setUndoCount(undo.current.length);
    save();
  };

  const isEmpty = useCallback(() => {
    const d = canvas.current!.getContext("2d")!.getImageData(0, 0, width, height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i]! > 0) return false;
    return true;
  }, [width, height]);

  useImperativeHandle(
    ref,
    () => ({
      isEmpty,
      toBlob: () => {
        const out = document.createElement("canvas");
        out.width = width;
        out.height = height;
        const o = out.getContext("2d")!;
        const source = canvas.current!.getContext("2d")!.getImageData(0, 0, width, height);
        const mask = o.createImageData(width, height);
        for (let i = 0; i < source.data.length; i += 4) {
          const v = source.data[i + 3]!;
          mask.data[i] = mask.data[i + 1] = mask.data[i + 2] = v;
          mask.data[i + 3] = 255;
        }
        o.putImageData(mask, 0, 0);
        return new Promise((resolve, reject) => out.toBlob((b) => (b ? resolve(b) : reject(new Error("cannot encode the mask"))), "image/png"));
      },
    }),
    [isEmpty, width, height],
  );

  return (
    <div className="mask-editor">
      <div className="mask-stage">
        <img src={src} alt="The picture to inpaint" draggable={false} />
        <canvas
          ref={canvas}
          width={width}
          height={height}
          className="mask-canvas"
          aria-label="Mask: paint over the area to change"
          data-testid="mask-canvas"
          onPointerDown={down}
          onPointerMove={move}
          onPointerUp={up}
          onPointerCancel={up}
        />
      </div>
      <div className="toolbar" role="toolbar" aria-label="Mask tools">
        <label className="inline">
          Brush {size}px
          <input type="range" min={1} max={Math.max(8, Math.round(Math.max(width, height) / 3))} value={size} onChange={(e) => setSize(Number(e.target.value))} />
        </label>
        <button type="button" aria-pressed={!eraser} onClick={() => setEraser(false)}>
          Brush
        </button>
        <button type="button" aria-pressed={eraser} onClick={() => setEraser(true)}>
          Eraser
        </button>
        <button type="button" onClick={invert}>
          Invert
        </button>
        <button type="button" onClick={clear}>
          Clear
        </button>
        <button type="button" onClick={back} disabled={undoCount === 0}>
          Undo
        </button>
      </div>
    </div>
  );
});
