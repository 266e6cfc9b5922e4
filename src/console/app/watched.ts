// A watch's objects kept as the stream says, rendered once per frame however many events arrive.
import { useEffect, useRef, useState } from 'preact/hooks';
import { watch } from './api.ts';

/** The objects of a watch by name, with a version that changes once per frame of events. */
export function useWatched<T extends { name: string }>(path: string) {
  const items = useRef(new Map<string, T>()).current;
  const [version, setVersion] = useState(0);
  const [error, setError] = useState<string | undefined>();
  useEffect(() => {
    let scheduled = false;
    const schedule = () => {
      if (scheduled) return;
      scheduled = true;
      requestAnimationFrame(() => {
        scheduled = false;
        setVersion((v) => v + 1);
      });
    };
    return watch<T>(path, {
      onReset: () => {
        items.clear();
        schedule();
      },
      onEvents: (events) => {
        for (const e of events) {
          if (e.type === 'DELETED') items.delete(e.object.name);
          else items.set(e.object.name, e.object);
        }
        schedule();
      },
      onError: setError,
    });
  }, [path]);
  return { items, version, error, loaded: version > 0 };
}
