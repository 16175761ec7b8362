// Result images. Their bytes always come through the API (`GET /v1/jobs/{id}/images/{n}`, with the token):
// the page's CSP lets it connect to its own origin only, and a presigned object-store URL expires after 24 h.
// A presigned URL is only shown as an <img> (which the CSP allows), falling back to the API when it fails.
import { useQueen } from "@sd-rbee/react";
import type { ImageResult } from "@sd-rbee/sdk";
import { useEffect, useState, type ImgHTMLAttributes } from "react";

/** The API's route of image `index` of job `jobId` (it needs the token). */
export function imagePath(jobId: string, index: number): string {
  return `/v1/jobs/${encodeURIComponent(jobId)}/images/${index}`;
}

/** `url` when an <img> may show it as it is: an absolute http(s) URL (a presigned one); not the API's own
 * routes (they need the token), nor any other scheme (the URL comes from a worker, unchecked). */
export function directUrl(url: string | null | undefined): string | undefined {
  if (!url) return undefined;
  try {
    const u = new URL(url);
    return u.protocol === "https:" || u.protocol === "http:" ? u.href : undefined;
  } catch {
    // relative (the API's route) or not a URL
    return undefined;
  }
}

/** Where image `image` of a job may be shown from directly: its presigned URL (of the status's `image_urls`,
 * else the image's own `url`), if any. */
export function presignedUrl(image: Pick<ImageResult, "url">, listed?: string): string | undefined {
  return directUrl(listed) ?? directUrl(image.url);
}

/** Image `index` of job `jobId`, fetched with the token, as a blob URL an <img> can show (revoked when unused);
 * nothing while `jobId` is undefined. */
export function useImageSrc(jobId: string | undefined, index: number): { src?: string; error?: Error } {
  const client = useQueen();
  const [state, setState] = useState<{ src?: string; error?: Error }>({});
  useEffect(() => {
    if (jobId === undefined) return setState({});
    const controller = new AbortController();
    let made: string | undefined;
    setState({});
    (async () => {
      try {
        const blob = await client.image(jobId, index, { signal: controller.signal });
        made = URL.createObjectURL(blob);
        if (!controller.signal.aborted) setState({ src: made });
      } catch (error) {
        // Aborted when the image is no longer shown: nothing to say.
        if (!controller.signal.aborted) setState({ error: error as Error });
      }
    })();
    return () => {
      controller.abort();
      if (made) URL.revokeObjectURL(made);
    };
  }, [client, jobId, index]);
  return state;
}

/** Image `index` of job `jobId`: from its presigned `url` when it has one, else (or once that fails to load,
 * e.g. expired) through the API. */
export function ResultImage({ jobId, index, url, alt, ...rest }: { jobId: string; index: number; url?: string; alt: string } & ImgHTMLAttributes<HTMLImageElement>) {
  const direct = directUrl(url);
  const [failed, setFailed] = useState<string | undefined>(undefined);
  const viaApi = !direct || failed === direct;
  const { src, error } = useImageSrc(viaApi ? jobId : undefined, index);
  if (!viaApi) return <img {...rest} src={direct} alt={alt} onError={() => setFailed(direct)} />;
  if (error) return <span className="img-error">Image unavailable: {error.message}</span>;
  if (!src) return <span className="img-loading" aria-label="Loading image" />;
  return <img {...rest} src={src} alt={alt} />;
}

/** A button that downloads image `index` of job `jobId` (through the API) under `name`. */
export function DownloadLink({ jobId, index, name }: { jobId: string; index: number; name: string }) {
  const client = useQueen();
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const download = async () => {
    setBusy(true);
    setError(null);
    try {
      const blob = await client.image(jobId, index);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    } catch (e) {
      setError(`Cannot download: ${(e as Error).message}`);
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button type="button" className="quiet" onClick={download} disabled={busy}>
        Download
      </button>
      {error && <span className="img-error">{error}</span>}
    </>
  );
}

export function extension(contentType: string): string {
  return contentType === "image/jpeg" ? "jpg" : contentType === "image/webp" ? "webp" : "png";
}
