// A job's images, each with its seed, a download, and "use as init image".
import { useQueen } from "@sd-rbee/react";
import type { ImageResult } from "@sd-rbee/sdk";
import { useState } from "react";

import { picture, useWorkspace } from "./workspace";
import { DownloadLink, extension, presignedUrl, ResultImage } from "./images";
import { go } from "./route";

export function ImageGrid({ jobId, images, urls }: { jobId: string; images: ImageResult[]; urls?: string[] }) {
  const client = useQueen();
  const { setInit, setForm } = useWorkspace();
  const [error, setError] = useState<string | null>(null);
  const useAsInit = async (index: number) => {
    try {
      // Through the API: the page may not fetch from the bucket, and a presigned URL expires.
      setInit(await picture(await client.image(jobId, index)));
      setForm((f) => ({ ...f, mode: f.mode === "txt2img" ? "img2img" : f.mode }));
      go({ page: "generate" });
    } catch (e) {
      setError(`Cannot use the image: ${(e as Error).message}`);
    }
  };
  return (
    <div className="images">
      {images.map((image, i) => (
        <figure key={image.index} className="result">
          <ResultImage jobId={jobId} index={image.index} url={presignedUrl(image, urls?.[i])} alt={`Image ${image.index + 1}, seed ${image.seed}`} width={image.width} height={image.height} data-testid="result-image" />
          <figcaption>
            <span>
              {image.width} × {image.height} · seed {image.seed}
            </span>
            <DownloadLink jobId={jobId} index={image.index} name={`${jobId}-${image.index}.${extension(image.content_type)}`} />
            <button type="button" className="quiet" onClick={() => useAsInit(image.index)}>
              Use as init image
            </button>
          </figcaption>
        </figure>
      ))}
      {error && <p className="error">{error}</p>}
    </div>
  );
}
