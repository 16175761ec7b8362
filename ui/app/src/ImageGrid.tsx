// A job's images, each with its seed, a download, and "use as init image".
import { useQueen } from "@sd-rbee/react";
import type { ImageResult } from "@sd-rbee/sdk";
import { useState } from "react";

import { picture, useWorkspace } from "./workspace";
import { DownloadLink, extension, fetchImage, imageUrl, ResultImage } from "./images";
import { go } from "./route";

export function ImageGrid({ jobId, images, urls }: { jobId: string; images: ImageResult[]; urls?: string[] }) {
  const client = useQueen();
  const { setInit, setForm } = useWorkspace();
  const [error, setError] = useState<string | null>(null);
  const useAsInit = async (url: string) => {
    try {
      setInit(await picture(await fetchImage(client, url)));
      setForm((f) => ({ ...f, mode: f.mode === "txt2img" ? "img2img" : f.mode }));
      go({ page: "generate" });
    } catch (e) {
      setError((e as Error).message);
    }
  };
  return (
    <div className="images">
      {images.map((image, i) => {
        const url = urls?.[i] ?? imageUrl({ job_id: jobId }, image);
        return (
          <figure key={image.index} className="result">
            <ResultImage url={url} alt={`Image ${image.index + 1}, seed ${image.seed}`} width={image.width} height={image.height} data-testid="result-image" />
            <figcaption>
              <span>
                {image.width} × {image.height} · seed {image.seed}
              </span>
              <DownloadLink url={url} name={`${jobId}-${image.index}.${extension(image.content_type)}`} />
              <button type="button" className="quiet" onClick={() => useAsInit(url)}>
                Use as init image
              </button>
            </figcaption>
          </figure>
        );
      })}
      {error && <p className="error">{error}</p>}
    </div>
  );
}
