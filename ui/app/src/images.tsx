// Result images: the queen's own image URLs need the bearer token, so they are fetched and shown as blob
// URLs; presigned object-store URLs are shown as they are.
import { useQueen } from "@sd-rbee/react";
import type { ImageResult, JobStatus } from "@sd-rbee/sdk";
import { useEffect, useState, type ImgHTMLAttributes } from "react";

/** Where image `image` of `job` is: its presigned URL, else the API's image endpoint. */
export function imageUrl(job: Pick<JobStatus, "job_id">, image: ImageResult): string {
  return image.url ?? `/v1/jobs/${job.job_id}/images/${image.index}`;
}

function needsToken(url: string): boolean {
  return url.startsWith("/v1/");
}

/** The image at `url` as a URL an <img> can show (a blob URL for the API's own, revoked when unused). */
export function useImageSrc(url: string | undefined): { src?: string; error?: Error } {
  const client = useQueen();
  const [state, setState] = useState<{ src?: string; error?: Error }>({});
  useEffect(() => {
    if (!url) return setState({});
    if (!needsToken(url)) return setState({ src: url });
    const controller = new AbortController();
    let made: string | undefined;
    (async () => {
      try {
        const blob = await (await client.send("GET", url, { signal: controller.signal })).blob();
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
  }, [client, url]);
  return state;
}

/** The image's bytes, for downloading it or starting from it. */
export async function fetchImage(client: ReturnType<typeof useQueen>, url: string): Promise<Blob> {
  if (needsToken(url)) return (await client.send("GET", url)).blob();
  const r = await fetch(url);
  if (!r.ok) throw new Error(`cannot fetch the image (HTTP ${r.status})`);
  return r.blob();
}

export function ResultImage({ url, alt, ...rest }: { url: string; alt: string } & ImgHTMLAttributes<HTMLImageElement>) {
  const { src, error } = useImageSrc(url);
  if (error) return <span className="img-error">Image unavailable: {error.message}</span>;
  if (!src) return <span className="img-loading" aria-label="Loading image" />;
  return <img src={src} alt={alt} {...rest} />;
}

/** A link that downloads the image under `name`. */
export function DownloadLink({ url, name }: { url: string; name: string }) {
  const client = useQueen();
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const download = async () => {
    setBusy(true);
    setError(null);
    try {
      const blob = await fetchImage(client, url);
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
